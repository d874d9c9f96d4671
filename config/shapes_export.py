# The shapes recipe in SmolVLM's (Idefics3) architecture, so that export.py turns the run into a transformers model:
#   python train_vlm.py config/shapes.py config/shapes_export.py && python export.py out/shapes_export out/shapes_export_hf
# On top of config/shapes.py: SmolVLM's projector (pixel shuffle, one bias-free linear layer), its image-token
# layout, and plain patches (overlapping ones have no counterpart in transformers).
out_dir = 'out/shapes_export'
connector = 'pixel_shuffle_linear'
image_layout = 'idefics3'
patch_overlap = 0
# the dataset's own 64px (the exported processor resizes nothing) and the AdamW recipe its figures were measured with
image_size = 64
pixel_shuffle_factor = 2
optimizer = 'adamw'
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
