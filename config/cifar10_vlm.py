# The CIFAR-10 + Phi-2 QLoRA recipe, stage 2: the stage-1 CIFAR-10 tower (config/cifar10_siglip.py) frozen, an MLP
# projector, and Phi-2 adapted with QLoRA (4-bit NF4 base, rank-stabilised LoRA, gradient checkpointing), on the same
# descriptions:
#   python train_vlm.py config/cifar10_vlm.py
out_dir = 'out/cifar10_vlm'
data_dir = 'data/cifar10'
vision = 'out/cifar10_siglip'
vision_mode = 'frozen'
connector = 'mlp'  # 64 image tokens
llm = 'microsoft/phi-2'
llm_mode = 'qlora'
lora_r = 16
lora_alpha = 32
rslora = True
grad_checkpointing = True
max_seq_len = 256
batch_size = 4  # the recipe's: 4 x 16 accumulation
grad_accum = 16
max_iters = 2340  # 3 epochs of 50,000 images at 64 a step
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 100
eval_interval = 250
eval_questions = 500  # the class questions prepare_data.py holds out
eval_captions = 200
