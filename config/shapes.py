# The default recipe: a tiny VLM learns the synthetic shapes scenes from scratch on a laptop CPU.
#   python prepare_data.py shapes && python train_vlm.py config/shapes.py
# 28.6 minutes of training on a 2-core CPU (AVX512-BF16), 93.6% on the test questions; docs/LOG.md has
# the learning curve.
out_dir = 'out/shapes'
data_dir = 'data/shapes'
# Each question-answer pair (and the caption) of an image is its own single-turn sample: it sees the
# image, never an earlier answer. The image is encoded once for all of them.
isolate_turns = True
# Each 8x8 patch embedding also sees 4 pixels of its neighbours: shapes are learned sooner (docs/LOG.md)
patch_overlap = 4
batch_size = 32
max_iters = 4000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
eval_interval = 300
eval_questions = 500
# torch.compile: more steps per second for a minute of compilation, counted as training time (docs/LOG.md)
compile = True
