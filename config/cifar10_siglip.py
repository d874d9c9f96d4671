# The CIFAR-10 + Phi-2 QLoRA recipe, stage 1: a CIFAR-10 ViT trained with the sigmoid loss against frozen Phi-2 text
# features, on five VLM-written descriptions per image (classify.py --mode=label writes them); --image_tower=resnet50
# trains the recipe's ResNet-50 instead (retrieval and zero-shot only: the VLM takes ViT towers). Then
# config/cifar10_vlm.py.
#   python prepare_data.py cifar10 --root cifar-10-batches-py --descriptions descriptions.csv --out_dir data/cifar10
#   python train_siglip.py config/cifar10_siglip.py
out_dir = 'out/cifar10_siglip'
data_dir = 'data/cifar10'
image_tower = 'vit'
image_size = 32
patch_size = 4  # 64 patches of a 32x32 image
vit_layers = 6
vit_width = 256
vit_heads = 8
text_tower = 'microsoft/phi-2'  # frozen, mean-pooled hidden states, cached once; any local dir or .gguf works
embed_dim = 512  # the recipe's shared embedding size
batch_size = 32  # the recipe's
max_iters = 15600  # 10 epochs of 50,000 images at 32 a step
learning_rate = 1e-4  # the recipe's
min_lr = 1e-5
warmup_iters = 500
eval_interval = 1000
