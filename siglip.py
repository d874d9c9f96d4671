"""
Stage 1's text towers and sigmoid loss, on model.py's blocks.

An image tower and a text tower meet in a shared embedding space, trained with the sigmoid loss of
Zhai et al. 2023 (train_siglip.py); the image tower then feeds the VLM. The image tower is model.py's
VisionTower (mean-pooled) or torchvision's ResNet-50; the text tower is a small byte transformer of
model.py's ViTBlocks, or the cached features of a frozen encoder (pretrained.FrozenTextEncoder).

    TextConfig / TextTower   byte tokens, a bidirectional pre-norm transformer, mean pooling
    ResNetTower              torchvision's ResNet-50 from scratch, globally average-pooled
    siglip_loss              the sigmoid loss, across ranks with gather_with_grad under DDP
    SigLIPConfig / SigLIP    both towers, their projection heads, the learned temperature and bias
"""
import math
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import ViTBlock, ViTConfig, VisionTower, init_weights


@dataclass
class TextConfig:
    """The small trainable text tower: byte tokens, a bidirectional pre-norm transformer, mean pooling."""
    vocab_size: int = 263  # the byte tokenizer's: 7 specials + 256 bytes
    max_len: int = 192
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    act: str = 'gelu'  # the ViTBlock fields it shares with ViTConfig
    layer_scale: float = 0.0


def masked_mean(x, mask):  # x (B, T, C), mask (B, T) bool -> (B, C): the mean over real tokens
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.max_len, cfg.n_embd) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layer))  # ViTBlock has the fields it needs
        self.ln_post = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)

    def forward(self, ids, mask, groups=4):  # ids (B, T), mask (B, T) bool, padding on the right -> (B, C)
        # Sorted by length and run in a few groups, each cut to its own longest: short captions batched with
        # long ones would otherwise pay for the padding (shapes' per-object captions are ~20 bytes, its scene
        # captions ~75 and up to 125; two groups ran the text tower 2x faster there).
        lengths = mask.sum(1)
        order = lengths.argsort()
        out = [self.encode(ids[g, :int(lengths[g].max())], mask[g, :int(lengths[g].max())])
               for g in order.chunk(groups)]
        return torch.cat(out)[order.argsort()]

    def encode(self, ids, mask):
        x = self.tok_embed(ids) + self.pos_embed[:, :ids.shape[1]]
        for block in self.blocks:
            x = block(x, mask[:, None, None, :])  # no token attends to padding
        return masked_mean(self.ln_post(x), mask)


class ResNetTower(nn.Module):
    """torchvision's ResNet-50 from scratch (the CIFAR-10 recipe's image tower), globally average-pooled: (B, 2048)."""

    def __init__(self, image_mean, image_std):
        super().__init__()
        import torchvision  # only this tower needs it
        self.net = torchvision.models.resnet50(weights=None)
        self.net.fc = nn.Identity()
        self.register_buffer('mean', torch.tensor(image_mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer('std', torch.tensor(image_std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images):  # (B, H, W, 3) uint8
        return self.net((images.permute(0, 3, 1, 2).float() - self.mean) / self.std)


@dataclass
class SigLIPConfig:
    image_tower: str = 'vit'  # 'vit' (glimpse's VisionTower, mean-pooled) or 'resnet50'
    vision: ViTConfig = field(default_factory=ViTConfig)  # also gives the ResNet its image mean/std
    text_tower: str = 'byte'  # 'byte' (TextTower, trained) or 'frozen' (features of a frozen encoder)
    text: TextConfig = field(default_factory=TextConfig)
    text_feature_dim: int = 0  # 'frozen': the width of the frozen encoder's features
    embed_dim: int = 128
    init_logit_scale: float = 10.0  # the paper's t = exp(t') = 10 and b = -10, for its batches of 32k
    init_logit_bias: float = -10.0

    @classmethod
    def from_dict(cls, d):
        return cls(d['image_tower'], ViTConfig(**d['vision']), d['text_tower'], TextConfig(**d['text']),
                   d['text_feature_dim'], d['embed_dim'], d['init_logit_scale'], d['init_logit_bias'])

    def to_dict(self):
        return asdict(self)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather of (B, D) rows into (W*B, D) that keeps the gradient path (torch.distributed.all_gather
    does not): every rank's loss touches every rank's rows, so backward sums the gradients over ranks
    and hands each rank the rows it contributed."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        dist.all_reduce(grad)
        B = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * B:(dist.get_rank() + 1) * B]


@torch.compiler.disable  # a collective inside an autograd Function: run it eagerly
def gather_with_grad(x):
    return _GatherWithGrad.apply(x)


def siglip_loss(img_emb, txt_emb, log_t, bias, distributed=False, text_ids=None, image_ids=None):
    """The sigmoid loss (Zhai et al. 2023, eq. 1) of unit-norm img_emb (B, D) and txt_emb (T, D): every
    image against every text, -log sigmoid(z * (exp(t') cos + b)) with z = +1 for a text that describes
    the image and -1 for all others, summed over pairs and averaged over images.
    text_ids (T,): an id per distinct text. image_ids (B, K): the ids of each image's texts (-1 fills a
    short row). A text is positive for an image when its id is one of the image's: an identical caption
    (short captions repeat within a batch) or another of the image's captions is never pushed away; a text
    that repeats is scored once.
    By default image i's only text is row i (T = B); text_ids alone: image i's texts are those equal to text i.
    distributed=True: each rank's images meet the texts of all ranks, gathered with their gradient (ranks
    with fewer texts pad theirs, and the padding is left out); dividing by the local B makes DDP's mean
    over ranks equal one process on the global batch."""
    B, dev = img_emb.shape[0], img_emb.device
    if text_ids is None:  # every text is distinct: each image's own is the only positive
        text_ids = torch.arange(txt_emb.shape[0], device=dev) + (torch.distributed.get_rank() * B if distributed else 0)
    if image_ids is None:
        image_ids = text_ids[:B, None]
    if distributed:
        import torch.distributed as dist
        n = torch.tensor([txt_emb.shape[0]], device=dev)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        pad = int(n) - txt_emb.shape[0]
        txt_emb = gather_with_grad(F.pad(txt_emb, (0, 0, 0, pad)))  # (W*T, D)
        text_ids = gather_with_grad(F.pad(text_ids, (0, pad), value=-1))  # integers carry no gradient
    with torch.autocast(dev.type, enabled=False):  # logits and loss in fp32
        logits = img_emb.float() @ txt_emb.float().T * log_t.float().exp() + bias.float()  # (B, W*T)
        positive = (image_ids[:, :, None] == text_ids[None, None, :]).any(1)  # (B, W*T)
        # a text repeated in the step is scored once, where it first appears (so N ranks equal one process),
        # and padding not at all
        repeat = (text_ids[:, None] == text_ids[None, :]).tril(-1).any(1)
        real = ((text_ids >= 0) & ~repeat).float()
        return -(F.logsigmoid((positive.float() * 2 - 1) * logits) * real).sum() / B


class SigLIP(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.image_tower == 'vit':
            self.vision_tower, width = VisionTower(cfg.vision), cfg.vision.n_embd
        elif cfg.image_tower == 'resnet50':
            self.vision_tower, width = ResNetTower(cfg.vision.image_mean, cfg.vision.image_std), 2048
        else:
            raise ValueError(f"unknown image_tower '{cfg.image_tower}': use 'vit' or 'resnet50'")
        self.image_head = nn.Linear(width, cfg.embed_dim)
        if cfg.text_tower == 'byte':
            self.text_tower, text_width = TextTower(cfg.text), cfg.text.n_embd
        elif cfg.text_tower == 'frozen':
            self.text_tower, text_width = None, cfg.text_feature_dim  # only the projection trains
        else:
            raise ValueError(f"unknown text_tower '{cfg.text_tower}': use 'byte' or 'frozen'")
        self.text_head = nn.Linear(text_width, cfg.embed_dim)
        for m in (self.vision_tower if cfg.image_tower == 'vit' else None, self.text_tower,
                  self.image_head, self.text_head):
            if m is not None:
                m.apply(init_weights)  # the ResNet keeps torchvision's init
        self.log_t = nn.Parameter(torch.tensor(math.log(cfg.init_logit_scale)))  # t' = log t
        self.bias = nn.Parameter(torch.tensor(cfg.init_logit_bias))

    def encode_image(self, images):  # (B, H, W, 3) uint8 -> (B, D) unit norm
        x = self.vision_tower(images)
        if x.dim() == 3:
            x = x.mean(1)  # ViT: (B, N, C) -> (B, C), the mean over patches
        return F.normalize(self.image_head(x), dim=-1)

    def encode_text(self, ids=None, mask=None, features=None):
        """Byte tower: ids, mask (B, T). Frozen tower: its cached features (B, F). -> (B, D) unit norm."""
        x = self.text_tower(ids, mask) if self.text_tower is not None else features
        return F.normalize(self.text_head(x.to(self.text_head.weight.dtype)), dim=-1)

    def forward(self, images, ids=None, mask=None, features=None, distributed=False, text_ids=None, image_ids=None):
        return siglip_loss(self.encode_image(images), self.encode_text(ids, mask, features),
                           self.log_t, self.bias, distributed, text_ids, image_ids)
