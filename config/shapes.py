# The default recipe: a tiny VLM learns the synthetic shapes scenes from scratch on a laptop CPU.
#   python prepare_data.py shapes && python train_vlm.py config/shapes.py
# Figures for the Quick start (--max_iters=400) and this full run, per machine class: README, docs/LOG.md.
out_dir = 'out/shapes'
data_dir = 'data/shapes'
# One image token per grid cell: the 64px scenes are resized to 72px, so each of the 3x3 cells is 3x3 patches
# of 8px, and a 3x3 pixel shuffle makes each cell's 9 patches one token (docs/LOG.md: the grid lever).
image_size = 72
pixel_shuffle_factor = 3
# Each question-answer pair (and the caption) of an image is its own single-turn sample: it sees the
# image, never an earlier answer. The image is encoded once for all of them.
isolate_turns = True
# Each 8x8 patch embedding also sees 4 pixels of its neighbours: shapes are learned sooner (docs/LOG.md)
patch_overlap = 4
# Muon for the weight matrices: colors are read after 100 steps, not 1000 (docs/LOG.md)
optimizer = 'muon'
batch_size = 32
max_iters = 1500
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
eval_interval = 100
eval_questions = 500
compile = False  # on CPUs it buys little over a short run (docs/LOG.md); on a GPU, --compile=True
