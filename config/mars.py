# The Mars-terrain classifier recipe: SmolVLM-256M-Instruct (hf_vlm; SmolVLM-500M-Instruct is the recommended size) + LoRA as a Mars-terrain classifier
# on Mirali33/mb-domars16k: 15 classes answered by three-letter codes (no captions, so no "Reasoning:"), config/mars_prompt.txt.
#   python prepare_data.py hf --dataset Mirali33/mb-domars16k --out_dir data/mars --image_size 224 --class_names ael,aec,cli,rid,fsf,sfe,fsg,fse,fss,cra,sfx,mix,rou,smo,tex
#   python classify.py --mode=convert --data_dir=data/mars --convert_dir=data/mars_cls --template=@config/mars_prompt.txt
#   python train_vlm.py config/mars.py   (once, online: hf download HuggingFaceTB/SmolVLM-256M-Instruct; --dataset takes a save_to_disk dir)
#   python classify.py --out_dir=out/mars --data_dir=data/mars --template=@config/mars_prompt.txt --batch_size=8   # test accuracy, confusion
out_dir = 'out/mars'
data_dir = 'data/mars_cls'
hf_vlm = 'HuggingFaceTB/SmolVLM-256M-Instruct'
vision_mode = 'frozen'
llm_mode = 'lora'  # on the language model's attention and MLP projections
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
# SmolVLM's processor turns each image into 4x4 crops of 512 pixels plus a global view: 17 x 64 image tokens,
# then ~400 prompt tokens
max_seq_len = 2048
batch_size = 4
grad_accum = 4
max_iters = 1000  # 16,000 conversations at 16 a step (the dataset holds ~16k images in all)
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 50
weight_decay = 0.0
grad_checkpointing = True
eval_interval = 200
eval_questions = 200  # val images asked the class question, answered by generation
val_batches = 8
test_questions = 1000
