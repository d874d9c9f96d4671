# Stage 1 on shapes: the shapes recipe's ViT (4x128, overlapping 8x8 patches) against a small byte-level text
# transformer on the captions, sigmoid loss; --text_tower=smollm2 uses frozen SmolLM2-135M features instead.
#   python train_siglip.py config/shapes_siglip.py
#   python train_vlm.py config/shapes.py --vision=out/shapes_siglip --vision_layer=-2   (docs/LOG.md: why -2)
# 6000 steps on one core: zero-shot shape 97.0%, colour 96.4% (79 min); smollm2 98.0% / 96.2% (24.6 min, at b = -10),
# and only the smollm2 tower beats scratch in the VLM (95.5% against 93.6% test). docs/LOG.md has the sweeps.
out_dir = 'out/shapes_siglip'
data_dir = 'data/shapes'
image_tower = 'vit'
patch_overlap = 4  # the same tower as config/shapes.py, so train_vlm.py can load it
vit_layers = 4
vit_width = 128
vit_heads = 4
text_tower = 'byte'
captions_per_step = 'all'
init_logit_bias = -4.0  # docs/LOG.md: -10 (the paper's, for batches of 32k) leaves the byte tower at chance for 500+ steps
text_lr = 2e-5  # docs/LOG.md: the byte text tower 50x slower than the rest
batch_size = 64
max_iters = 6000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100  # full-rate early steps from the paper's initial logits collapse both towers (docs/LOG.md)
eval_interval = 500
eval_samples = 500
