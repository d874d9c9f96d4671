# The fine-detail recipe as stock llama.cpp runs it: export.py --gguf writes a model.gguf and mmproj.gguf that
# llama-mtmd-cli answers with as glimpse does (docs/LOG.md). On top of config/shapes.py and config/shapes_detail.py:
# SmolVLM's projector and plain patches (as config/shapes_export.py), and what llama.cpp does its own way: it
# splits every Idefics3 image (here always 3x3 tiles plus the global view), resizes with Lanczos, and its tower's
# GELU is the tanh one.
#   python train_vlm.py config/shapes.py config/shapes_detail.py config/shapes_gguf.py
#   python export.py out/shapes_gguf out/shapes_gguf_files --gguf
#   llama-mtmd-cli -m out/shapes_gguf_files/model.gguf --mmproj out/shapes_gguf_files/mmproj.gguf --jinja \
#       --image data/shapes_detail/examples/example0.png -p "<__media__>
#   how many objects are there?" --temp 0
out_dir = 'out/shapes_gguf'
connector = 'pixel_shuffle_linear'
patch_overlap = 0
vit_act = 'gelu_tanh'
image_resample = 'lanczos'
