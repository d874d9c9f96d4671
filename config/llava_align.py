# The LLaVA-1.5 recipe, Prismatic-style, stage 1 "align": SigLIP@384 and Phi-2 both frozen, only the MLP projector
# trains, on the LLaVA-1.5 pretraining captions (558k); then config/llava_finetune.py.
#   python prepare_data.py llava --json blip_laion_cc_sbu_558k.json --images llava_pretrain/images \
#       --image_size 384 --shards --out_dir data/llava_558k
#   torchrun --standalone --nproc_per_node=8 train_vlm.py config/llava_align.py
# Weights: google/siglip-so400m-patch14-384, microsoft/phi-2 (Hugging Face cache, or --vision=... --llm=... dirs).
out_dir = 'out/llava_align'
data_dir = 'data/llava_558k'
num_workers = 4
vision = 'google/siglip-so400m-patch14-384'
vision_mode = 'frozen'
connector = 'mlp'  # 729 image tokens
llm = 'microsoft/phi-2'
llm_mode = 'frozen'
max_seq_len = 1024
batch_size = 32  # per GPU: 8 GPUs = 256 a step, as Prismatic's align stage
max_iters = 2180  # one epoch of 558k
learning_rate = 1e-3
min_lr = 0.0
warmup_iters = 65  # 3% of the steps
weight_decay = 0.0
eval_interval = 500
eval_questions = 200
test_at_end = False
compile = True
grad_checkpointing = True  # bench.py --plan: batch 32 of 1024-token rows needs ~124 GiB a GPU without it, ~23 with it
