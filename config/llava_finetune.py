# The LLaVA-1.5 recipe, Prismatic-style, stage 2 "finetune": the aligned projector and LoRA on Phi-2, SigLIP frozen,
# on the LLaVA-1.5 instruction mix (665k conversations, multi-turn).
#   python prepare_data.py llava --json llava_v1_5_mix665k.json --images llava_finetune_images \
#       --image_size 384 --shards --out_dir data/llava_665k
#   torchrun --standalone --nproc_per_node=8 train_vlm.py config/llava_finetune.py
# Single stage, no align run (Prismatic: as good for about a fifth less compute): --init_from=scratch --out_dir=out/llava_single_stage
out_dir = 'out/llava_finetune'
data_dir = 'data/llava_665k'
init_from = 'out/llava_align'  # the align stage's projector (and the same frozen towers)
num_workers = 4
vision = 'google/siglip-so400m-patch14-384'
vision_mode = 'frozen'
connector = 'mlp'
llm = 'microsoft/phi-2'
llm_mode = 'lora'
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
max_seq_len = 2048
batch_size = 16  # per GPU: 8 GPUs = 128 a step, as Prismatic's finetune stage
max_iters = 5200  # one epoch of 665k
learning_rate = 2e-4  # LoRA's usual rate (Prismatic's full finetune used 2e-5)
min_lr = 0.0
warmup_iters = 156  # 3%
weight_decay = 0.0
grad_checkpointing = True
eval_interval = 500
eval_questions = 200
test_at_end = False
compile = True
