# The COCO captioning recipe: COCO captions with a frozen CLIP ViT-B/16, an MLP projector and GPT-2 fine-tuned in full.
#   python prepare_data.py coco --annotations coco/annotations/captions_train2017.json \
#       --images coco/train2017 --image_size 224 --shards --out_dir data/coco
#   torchrun --standalone --nproc_per_node=4 train_vlm.py config/coco.py
# Weights: openai/clip-vit-base-patch16 and gpt2 from the Hugging Face cache (hf download <id> once) or
# local directories given as --vision=... --llm=...
out_dir = 'out/coco'
data_dir = 'data/coco'
num_workers = 4  # JPEG shards are decoded in DataLoader workers
vision = 'openai/clip-vit-base-patch16'
vision_layer = -2  # LLaVA's choice: the penultimate block's patch features
vision_mode = 'frozen'
connector = 'mlp'  # 196 image tokens
llm = 'gpt2'
llm_mode = 'full'
max_seq_len = 256  # 196 image tokens + a caption; GPT-2 has 1024 positions
batch_size = 16  # per GPU; x 2 accumulation x 4 GPUs = 128 captions a step
grad_accum = 2
max_iters = 20000  # ~4.5 epochs of COCO train2017's 591k captions (one sample per caption)
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 500
eval_interval = 1000
eval_questions = 0
eval_captions = 500  # BLEU-4 and CIDEr-D of greedy captions on 500 val images
early_stop_patience = 5
test_at_end = False
compile = True
