# The GroundCap bridge recipe: GroundCap-style captioning with a frozen DINOv2-large and a frozen Gemma-2-2B joined by a
# trainable cross-attention bridge; cosine 1e-5 -> 1e-6, gradient clipping 0.3, early stopping.
#   python prepare_data.py csv --csv groundcap.csv --image_column image --text_columns caption \
#       --image_size 224 --shards --out_dir data/groundcap          (or coco / llava, whichever layout you have)
#   torchrun --standalone --nproc_per_node=4 train_vlm.py config/groundcap.py
# Weights: facebook/dinov2-large and google/gemma-2-2b (Hugging Face cache or local directories).
out_dir = 'out/groundcap'
data_dir = 'data/groundcap'
num_workers = 4
vision = 'facebook/dinov2-large'
vision_cls = True  # 257 features: the class token and 256 patches, as the seed feeds the bridge
vision_mode = 'frozen'
connector = 'bridge'
bridge_heads = 8
llm = 'google/gemma-2-2b'
llm_mode = 'frozen'
max_seq_len = 128  # captions only: the image enters through the bridge, not as tokens
batch_size = 8
max_iters = 62820
learning_rate = 1e-5
min_lr = 1e-6
warmup_iters = 500
grad_clip = 0.3
eval_interval = 2000
eval_questions = 0
eval_captions = 200
early_stop_patience = 3
test_at_end = False
