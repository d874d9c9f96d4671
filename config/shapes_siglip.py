# Stage 1 on shapes: the shapes recipe's ViT (4x128, overlapping 8x8 patches) trained against a small
# byte-level text transformer on the captions with the sigmoid loss, then handed to the VLM:
#   python train_siglip.py config/shapes_siglip.py
#   python train_vlm.py config/shapes.py --vision=out/shapes_siglip
# --text_tower=smollm2 swaps the text transformer for frozen SmolLM2-135M features (cached once).
out_dir = 'out/shapes_siglip'
data_dir = 'data/shapes'
image_tower = 'vit'
patch_overlap = 4  # the same tower as config/shapes.py, so train_vlm.py can load it
vit_layers = 4
vit_width = 128
vit_heads = 4
text_tower = 'byte'
batch_size = 64
max_iters = 1000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100  # full-rate early steps from the paper's initial logits collapse both towers (README)
eval_interval = 100
eval_samples = 500
