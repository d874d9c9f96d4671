# Comparison across images: two shapes scenes a sample, and questions that only both answer ("which image has
# more objects?", "is the large shape the same in both images?") or that name one ("what color is the large
# object in the second image?"). On top of config/shapes.py; the record lists both images, one <image> each.
#   python prepare_data.py shapes --pairs --out_dir data/shapes_pairs
#   python train_vlm.py config/shapes.py config/shapes_pairs.py
# Figures (accuracy per question type against chance): docs/LOG.md.
out_dir = 'out/shapes_pairs'
data_dir = 'data/shapes_pairs'
max_iters = 800
