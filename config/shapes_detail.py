# Fine detail: small shapes on a 216px canvas, which the 72px tower cannot name from one view of the whole
# image. Image splitting (tiling.py) shows the tower 3x3 tiles of 72px (one grid cell each) plus the whole image,
# SmolVLM's way, with its <row_i_col_j> markers. On top of config/shapes.py (its tower, connector and optimizer):
#   python prepare_data.py shapes --out_dir data/shapes_detail --image_size 216 --object_scale 0.5 --n_train 20000
#   python train_vlm.py config/shapes.py config/shapes_detail.py          # splitting
#   python train_vlm.py config/shapes.py config/shapes_detail.py --image_splitting=False --out_dir=out/detail_single
# Figures (the same training minutes, with and without splitting): docs/LOG.md.
out_dir = 'out/shapes_detail'
data_dir = 'data/shapes_detail'
image_splitting = True
max_image_size = 216
image_layout = 'idefics3'
max_seq_len = 256  # 10 views of 9 tokens and their markers, then 6 questions and the caption
max_iters = 500
