# The default recipe: a tiny VLM learns the synthetic shapes scenes from scratch on a laptop CPU.
# python prepare_data.py shapes && python train_vlm.py config/shapes.py
out_dir = 'out/shapes'
data_dir = 'data/shapes'
