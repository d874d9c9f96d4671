# Fine detail: small shapes on a 192px canvas, which the 64px tower cannot name from one view of the whole
# image. Image splitting (tiling.py) shows the tower 3x3 tiles of 64px plus the whole image, SmolVLM's way.
#   python prepare_data.py shapes --out_dir data/shapes_detail --image_size 192 --object_scale 0.3
#   python train_vlm.py config/shapes.py config/shapes_detail.py          # splitting
#   python train_vlm.py config/shapes.py config/shapes_detail.py --image_splitting=False --out_dir=out/detail_single
# Figures (the same minutes, with and without splitting): docs/LOG.md. SmolVLM's architecture (pixel shuffle,
# one linear layer; its image-token layout; plain patches), so export.py writes an Idefics3 model that tiles
# each image as training did.
out_dir = 'out/shapes_detail'
data_dir = 'data/shapes_detail'
image_size = 64
max_image_size = 192
image_splitting = True
connector = 'pixel_shuffle_linear'
pixel_shuffle_factor = 2
image_layout = 'idefics3'
patch_overlap = 0
max_seq_len = 256
