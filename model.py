"""
Every native module of glimpse, in plain PyTorch (this file imports torch, and of glimpse only tiling.py):

    VisionTower   a ViT: patch embedding, learned positions, pre-norm blocks; it also holds SigLIP, CLIP and
                  DINOv2 weights (pretrained.load_pretrained_vision maps them in)
    MLPProjector / PixelShuffleProjector / CrossAttentionBridge   connectors from image features to the LLM
    Decoder       a Llama-style causal LM: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache
    VLM           image embeddings spliced in place of <image> placeholders; loss on answers only;
                  generate() with a KV cache; score() of given answers. It is handed its language model
                  (a Decoder, or pretrained.HFCausalLM for any other causal LM); it builds a Decoder otherwise

                 images (B, H, W, 3) uint8, or the tiles and global views of split images (tiling.py)
                          |
                    VisionTower            (B, N, Cv)
                          |
                     connector             (B, N', C)
                          |
    "<bos><|user|><image>...<image> question<|end|><|assistant|> answer<|end|>"
                          |  image embeddings replace the <image> token embeddings
                       Decoder             (B, T, C) -> logits over the vocabulary
"""
import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass, field, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tiling import Tiler
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets at prompt, image and padding positions


# -----------------------------------------------------------------------------
# Vision tower

@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    patch_overlap: int = 0  # pixels each patch also sees of its neighbours (0: plain ViT patchify)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0  # MLP width = round(mlp_ratio * n_embd)
    norm_eps: float = 1e-6
    image_mean: tuple = (0.5, 0.5, 0.5)  # images are normalised with what the tower was trained on
    image_std: tuple = (0.5, 0.5, 0.5)
    # An image of another size is resized (bicubic, antialiased, as the Hugging Face processors do):
    # resize_shortest=0 squashes it to image_size x image_size (SigLIP); resize_shortest=S resizes its
    # shorter side to S, then crops the centre image_size x image_size (CLIP, DINOv2).
    resize_shortest: int = 0
    resample: str = 'bicubic'  # or 'bilinear'; 'lanczos' only for split images' tiles (tiling.py, torchvision)
    # What pretrained towers need; the defaults are the scratch ViT.
    act: str = 'gelu'  # 'gelu', 'gelu_tanh' (SigLIP) or 'quick_gelu' (CLIP)
    patch_bias: bool = True  # CLIP's patch embedding has no bias
    cls_token: bool = False  # a learned class token before the patches (CLIP, DINOv2)
    n_registers: int = 0  # DINOv2 register tokens, after the class token, without positions (Darcet et al. 2023)
    pre_norm: bool = False  # a LayerNorm on the embeddings before the first block (CLIP's pre_layrnorm)
    post_norm: bool = True  # a LayerNorm on the output of the last block
    layer_scale: float = 0.0  # DINOv2's per-channel scale on each residual branch, its initial value (0: none)
    keep_cls: bool = False  # the class token is one of the output features (else patches only)
    source: str = ''  # where pretrained weights came from ('' = trained from scratch here)


ACTIVATIONS = {'gelu': F.gelu, 'gelu_tanh': lambda x: F.gelu(x, approximate='tanh'),
               'quick_gelu': lambda x: x * torch.sigmoid(1.702 * x)}


class ViTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.act = ACTIVATIONS[cfg.act]
        self.ln1 = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C, eps=cfg.norm_eps)
        hidden = round(C * cfg.mlp_ratio)
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)
        if cfg.layer_scale:
            self.ls1 = nn.Parameter(torch.full((C,), cfg.layer_scale))
            self.ls2 = nn.Parameter(torch.full((C,), cfg.layer_scale))

    def forward(self, x, mask=None):  # x (B, N, C); mask (B, 1, 1, N) bool of real tokens, for text
        B, N, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, hd), every token sees every token
        y = self.proj(y.transpose(1, 2).reshape(B, N, C))
        x = x + (y * self.ls1 if hasattr(self, 'ls1') else y)
        y = self.fc2(self.act(self.fc1(self.ln2(x))))
        return x + (y * self.ls2 if hasattr(self, 'ls2') else y)


def sincos_2d(grid, dim):
    """(grid*grid, dim) 2D sine-cosine position table: a quarter of the channels each for sin and cos
    of the row and of the column. The learned positions start here rather than at noise, so patches
    know where they are from the first step (as in Beyer et al. 2022, "Better plain ViT baselines")."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class VisionTower(nn.Module):
    """images (B, H, W, 3) uint8 -> features (B, num_tokens, n_embd): resize, normalise, patchify,
    [class token], positions, [registers], [pre-norm], blocks, [post-norm]; registers and (unless
    keep_cls) the class token are dropped from the output."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.num_tokens = self.num_patches + int(cfg.cls_token and cfg.keep_cls)  # what the connector gets
        k = cfg.patch_size + 2 * cfg.patch_overlap  # overlapping patches: an object cut by a patch border
        self.patch_embed = nn.Conv2d(3, cfg.n_embd, k, stride=cfg.patch_size, padding=cfg.patch_overlap,
                                     bias=cfg.patch_bias)
        pos = sincos_2d(int(math.isqrt(self.num_patches)), cfg.n_embd)
        if cfg.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
            pos = torch.cat([torch.zeros(1, cfg.n_embd), pos])  # the class token has a position too
        self.pos_embed = nn.Parameter(pos[None])
        if cfg.n_registers:
            self.registers = nn.Parameter(torch.zeros(1, cfg.n_registers, cfg.n_embd))
        if cfg.pre_norm:
            self.ln_pre = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layer))
        if cfg.post_norm:
            self.ln_post = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.register_buffer('mean', torch.tensor(cfg.image_mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer('std', torch.tensor(cfg.image_std).view(1, 3, 1, 1) * 255, persistent=False)

    def pixels(self, images):  # (B, H, W, 3) uint8 -> (B, 3, S, S) normalised, S = image_size
        x = images.permute(0, 3, 1, 2)  # (B, 3, H, W)
        H, W, S = x.shape[2], x.shape[3], self.cfg.image_size
        size = (S, S)
        if self.cfg.resize_shortest:  # shorter side to resize_shortest, the longer one rounded down
            r = self.cfg.resize_shortest
            size = (r, int(r * W / H)) if H <= W else (int(r * H / W), r)
        if (H, W) != size:
            # as the Hugging Face processors (torchvision) resize: with the 8-bit kernel on the CPU, else in
            # float, clamped and rounded to 8 bits
            resize = functools.partial(F.interpolate, size=size, mode=self.cfg.resample, antialias=True)
            x = resize(x) if x.device.type == 'cpu' else resize(x.float()).clamp(0, 255).round()
        x = x.float()
        if x.shape[2:] != (S, S):
            top, left = int((x.shape[2] - S) / 2), int((x.shape[3] - S) / 2)
            x = x[:, :, top:top + S, left:left + S]
        return (x - self.mean) / self.std

    def features(self, x):  # (B, 3, S, S) normalised -> (B, num_tokens, C)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        n_cls = int(self.cfg.cls_token)
        if n_cls:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.cfg.n_registers:
            x = torch.cat([x[:, :n_cls], self.registers.expand(x.shape[0], -1, -1), x[:, n_cls:]], dim=1)
        if self.cfg.pre_norm:
            x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        if self.cfg.post_norm:
            x = self.ln_post(x)
        patches = x[:, n_cls + self.cfg.n_registers:]  # (B, num_patches, C)
        return torch.cat([x[:, :1], patches], dim=1) if n_cls and self.cfg.keep_cls else patches

    def forward(self, images):  # (B, H, W, 3) uint8
        return self.features(self.pixels(images))


# -----------------------------------------------------------------------------
# Connectors: image features (B, N, Cv) -> LLM input embeddings (B, N', C)

@dataclass
class ConnectorConfig:
    kind: str = 'pixel_shuffle'  # 'mlp' (LLaVA-1.5's 2-layer GELU MLP), 'pixel_shuffle' (then the MLP),
    # 'pixel_shuffle_linear' (then one bias-free linear layer: SmolVLM's), or 'bridge' (cross-attention from the
    # text embeddings to the image features; no image tokens in the sequence)
    in_dim: int = 128
    out_dim: int = 256
    scale_factor: int = 2  # pixel_shuffle: s x s neighbouring patches become one token
    n_head: int = 8  # bridge: attention heads
    out_norm: bool = False  # an RMSNorm on the image tokens, its gain starting at the LLM's token-embedding scale


class MLPProjector(nn.Module):
    """LLaVA-1.5's two-layer MLP projector: Linear, GELU, Linear. out_norm: an RMSNorm ends it, so the image
    tokens' scale is the norm's gain (started at the LLM's token-embedding scale by VLM), not the weights'."""

    def __init__(self, in_dim, out_dim, out_norm=False):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.norm = RMSNorm(out_dim, 1e-6) if out_norm else None

    def forward(self, x):
        x = self.fc2(F.gelu(self.fc1(x)))
        return x if self.norm is None else self.norm(x)


class PixelShuffleProjector(nn.Module):
    """Space-to-depth on the patch grid: s*s times fewer, s*s times wider tokens, each feature ordered (row
    offset, column offset, channel) as Idefics3/SmolVLM's pixel_shuffle orders it; then the 2-layer MLP, or
    (linear=True, SmolVLM's projector) a single bias-free linear layer."""

    def __init__(self, in_dim, out_dim, scale_factor, linear=False, out_norm=False):
        super().__init__()
        self.s = scale_factor
        if linear:
            self.proj = nn.Linear(in_dim * scale_factor ** 2, out_dim, bias=False)
        else:
            self.mlp = MLPProjector(in_dim * scale_factor ** 2, out_dim, out_norm)

    def forward(self, x):  # (B, N, C)
        B, N, C = x.shape
        h = int(math.isqrt(N))
        s = self.s
        if h * h != N or h % s:
            raise ValueError(f"pixel_shuffle needs a square grid of patches divisible by {s}, got {N} tokens "
                             f"(a kept class token? use connector='mlp')")
        x = x.view(B, h // s, s, h // s, s, C).permute(0, 1, 3, 2, 4, 5)  # (B, h/s, w/s, s, s, C)
        x = x.reshape(B, N // s ** 2, s * s * C)
        return self.proj(x) if hasattr(self, 'proj') else self.mlp(x)


class CrossAttentionBridge(nn.Module):
    """The GroundCap recipe's bridge (config/groundcap.py) between a frozen vision tower and a frozen LLM: the
    image features are projected to the LLM's width and every text embedding attends to them (pre-norm
    multi-head cross-attention, then a feed-forward), each added through a tanh gate that starts at 0 (as
    Flamingo's gated cross-attention), so at initialisation the LLM sees its own token embeddings unchanged."""

    def __init__(self, in_dim, out_dim, n_head):
        super().__init__()
        if out_dim % n_head:
            raise ValueError(f'bridge: LLM width {out_dim} is not divisible by n_head={n_head}')
        self.n_head = n_head
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm_kv = nn.LayerNorm(out_dim)
        self.norm_q = nn.LayerNorm(out_dim)
        self.q = nn.Linear(out_dim, out_dim)
        self.kv = nn.Linear(out_dim, 2 * out_dim)
        self.o = nn.Linear(out_dim, out_dim)
        self.norm_ff = nn.LayerNorm(out_dim)
        self.ff = nn.Sequential(nn.Linear(out_dim, 4 * out_dim), nn.GELU(), nn.Linear(4 * out_dim, out_dim))
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ff = nn.Parameter(torch.zeros(1))

    def forward(self, x, features):  # x (B, T, C) text embeddings; features (B, N, C_vision)
        B, T, C = x.shape
        h = self.n_head
        k, v = self.kv(self.norm_kv(self.proj(features))).split(C, dim=-1)  # (B, N, C) each
        q = self.q(self.norm_q(x)).view(B, T, h, C // h).transpose(1, 2)  # (B, h, T, C/h)
        k, v = (t.view(B, -1, h, C // h).transpose(1, 2) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + torch.tanh(self.gate_attn) * self.o(a)
        return x + torch.tanh(self.gate_ff) * self.ff(self.norm_ff(x))


CONNECTORS = ('mlp', 'pixel_shuffle', 'pixel_shuffle_linear', 'bridge')  # the kinds build_connector builds


def build_connector(cfg: ConnectorConfig):
    """The connector of cfg.kind. A config's bad choices are refused at start-up by checkpoint.ModelSpec.check;
    what is refused here is a ConnectorConfig no connector can hold."""
    if cfg.out_norm and cfg.kind not in ('mlp', 'pixel_shuffle'):
        raise ValueError(f"out_norm ends the MLP projector: connector 'mlp' or 'pixel_shuffle', not {cfg.kind!r}")
    if cfg.kind == 'bridge':
        return CrossAttentionBridge(cfg.in_dim, cfg.out_dim, cfg.n_head)
    if cfg.kind == 'mlp':
        return MLPProjector(cfg.in_dim, cfg.out_dim, cfg.out_norm)
    if cfg.kind in ('pixel_shuffle', 'pixel_shuffle_linear'):
        return PixelShuffleProjector(cfg.in_dim, cfg.out_dim, cfg.scale_factor, linear=cfg.kind == 'pixel_shuffle_linear',
                                     out_norm=cfg.out_norm)
    raise ValueError(f"unknown connector '{cfg.kind}': use 'mlp', 'pixel_shuffle', 'pixel_shuffle_linear' or 'bridge'")


# -----------------------------------------------------------------------------
# Decoder (Llama family layout and parameter names, so pretrained weights map one to one)

@dataclass
class DecoderConfig:
    vocab_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: n_head / n_kv_head queries share a key/value head
    n_embd: int = 256
    intermediate_size: int = 688  # SwiGLU hidden width, ~8/3 * n_embd
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(positions, head_dim, theta):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # rotate-half convention, as in the Llama checkpoints
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, one entry per layer, grown by concatenation."""

    def __init__(self, n_layer):
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def update(self, layer, k, v):  # (B, kv, T, hd)
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def __len__(self):
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def batch_repeat_interleave(self, n):  # each row n times, as transformers' DynamicCache does it
        self.k = [k.repeat_interleave(n, 0) for k in self.k]
        self.v = [v.repeat_interleave(n, 0) for v in self.v]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):  # x (B, T, C); mask (B, 1, T, S) bool, or None: causal
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, kv, S, hd)
        # no mask: plain causal attention, which the flash kernels take; the query heads share their key/value
        # head in the kernel (enable_gqa), without copies of K and V. A BlockMask: FlexAttention.
        gqa = self.n_head != self.n_kv_head
        if isinstance(mask, BlockMask):
            y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa)
        elif mask is not None and gqa and q.is_cuda:
            # CUDA's memory-efficient kernel takes a mask but not grouped-query heads (a mask with enable_gqa
            # leaves only the math kernel, which materialises the scores): K and V repeated per query head
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1) for t in (k, v))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(key_valid, T, segment_ids=None, sample_ids=None):
    """(B, S) bool of real keys -> (B, 1, T, S) bool for the last T queries: causal AND real key.
    With segment_ids (B, S) (no cache), a token sees the shared prefix (segment 0) and its own segment.
    With sample_ids (B, S) (packed samples, no cache), a token sees only its own sample (segments are then
    each sample's own). Every query also sees itself, so a padding row is never fully masked (no NaN)."""
    S = key_valid.shape[1]
    q_idx = torch.arange(S - T, S, device=key_valid.device)[:, None]
    k_idx = torch.arange(S, device=key_valid.device)[None, :]
    mask = (k_idx <= q_idx) & key_valid[:, None, None, :]
    if segment_ids is not None:
        seg_q, seg_k = segment_ids[:, None, :, None], segment_ids[:, None, None, :]
        mask = mask & ((seg_k == 0) | (seg_k == seg_q))
    if sample_ids is not None:
        mask = mask & (sample_ids[:, None, :, None] == sample_ids[:, None, None, :])
    return mask | (k_idx == q_idx)


def flex_block_mask(key_valid, segment_ids=None, sample_ids=None):
    """attention_mask's rule (no cache) as a FlexAttention BlockMask, which skips the blocks of 128 x 128 that
    no query sees (other samples, other turns, padding) instead of computing and masking them."""
    def visible(b, h, q, k):
        ok = (k <= q) & key_valid[b, k]
        if segment_ids is not None:
            ok = ok & ((segment_ids[b, k] == 0) | (segment_ids[b, k] == segment_ids[b, q]))
        if sample_ids is not None:
            ok = ok & (sample_ids[b, k] == sample_ids[b, q])
        return ok | (q == k)
    B, T = key_valid.shape
    return create_block_mask(visible, B, None, T, T, device=key_valid.device)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process: uncompiled it is a slow reference implementation. Batches
    differ in (B, T) (collate pads to each batch's longest row; pack_samples varies B): dynamo's automatic
    dynamic shapes compile once for the first shape and once more with both dimensions symbolic, so every later
    shape runs compiled. (dynamic=False recompiled for each shape, and past the recompile limit ran the eager
    reference, which materialises the whole score matrix.)"""
    return torch.compile(flex_attention)


def current_sdpa_backends():
    b = torch.backends.cuda  # these flags also pick the CPU kernels
    on = {SDPBackend.MATH: b.math_sdp_enabled(), SDPBackend.FLASH_ATTENTION: b.flash_sdp_enabled(),
          SDPBackend.EFFICIENT_ATTENTION: b.mem_efficient_sdp_enabled(), SDPBackend.CUDNN_ATTENTION: b.cudnn_sdp_enabled()}
    return [k for k, v in on.items() if v]


def checkpoint_context():
    """checkpoint's context_fn, called at each forward: the forward as it is, the recomputation with the
    forward's attention backends (checkpoint replays autocast, not sdpa_kernel). Not under torch.compile,
    where the recomputation is the traced graph's own ops, kernels chosen already, and checkpoint takes no
    context_fn but its default or one that makes dispatch modes (selective checkpointing's)."""
    return nullcontext(), sdpa_kernel(current_sdpa_backends())




class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.grad_checkpointing = False  # recompute each block's activations in backward: less memory
        # masked attention (isolated turns, packed samples) in training: 'sdpa' (an explicit boolean mask) or
        # 'flex' (FlexAttention, compiled: skips masked-out blocks; worth it on long packed rows on a GPU)
        self.attention = 'sdpa'

    def new_cache(self):
        return KVCache(self.cfg.n_layer)

    def forward(self, x, positions, key_valid, cache=None, segment_ids=None, right_padded=False, sample_ids=None):
        """x (B, T, C) input embeddings; positions (B, T); key_valid (B, S) with S = cached + T;
        segment_ids (B, T) for isolated turns, sample_ids (B, T) for packed samples (see attention_mask).
        right_padded: the padding is at the end of each row and its outputs are not used (a training batch),
        so causal attention alone is exact for every real token: no mask is built. Returns the final hidden
        states (B, T, C)."""
        cos, sin = rope_cos_sin(positions, self.cfg.n_embd // self.cfg.n_head, self.cfg.rope_theta)
        causal = right_padded and cache is None and segment_ids is None and sample_ids is None
        if causal:
            mask = None
        elif self.attention == 'flex' and cache is None:
            mask = flex_block_mask(key_valid, segment_ids, sample_ids)
        else:
            mask = attention_mask(key_valid, x.shape[1], segment_ids, sample_ids)
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # non-reentrant: gradients reach the block's adapters even when x needs none (frozen
                # embeddings). Autocast is replayed by checkpoint, the attention backend is not: do it here.
                ctx = {} if torch.compiler.is_compiling() else {'context_fn': checkpoint_context}
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False, **ctx)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


# -----------------------------------------------------------------------------
# The VLM

@dataclass
class VLMConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: DecoderConfig = field(default_factory=DecoderConfig)
    image_token_id: int = 5
    # the config.to_dict() of a Hugging Face causal LM run through pretrained.HFCausalLM (handed to VLM as
    # its llm); None: the native Decoder (then llm describes it exactly; with HFCausalLM only its sizes)
    hf_llm: dict = None
    # image splitting (tiling.py): each image resized to this longest edge, then cut into tiles of the tower's
    # image_size plus a global view; 0: each image is one image_size view
    max_image_size: int = 0

    @classmethod
    def from_dict(cls, d):
        return cls(ViTConfig(**d['vision']), ConnectorConfig(**d['connector']), DecoderConfig(**d['llm']),
                   d['image_token_id'], d.get('hf_llm'), d.get('max_image_size', 0))

    def to_dict(self):
        return asdict(self)

    def training_flops_per_sample(self, n_text_tokens, num_image_tokens, vision_mode='full', llm_mode='full',
                                  n_supervised=None, lora_params=(0, 0)):
        """Matmul FLOPs of one training sample, forward and backward, as the PaLM paper counts them (Chowdhery et
        al. 2022, appendix B; nanoGPT's estimate_mfu and nanochat's estimate_flops count the same way): per
        parameter per token 2 forward, 2 for the gradient of its input, 2 for the gradient of its weight (plus
        attention scores). A part that is not 'full' (frozen, lora, qlora) skips its weight gradients; a frozen
        vision tower, with nothing trained before it, skips its backward altogether. lora_params (vision, llm): the
        adapters' parameter counts, each trained in full over its part's tokens. The LM head runs only where there
        is a loss (VLM.forward with targets): n_supervised tokens a sample, None = every token. Lookups cost
        nothing. perf.step_flops sums it over a step's batches for MFU."""
        v, d = self.vision, self.llm
        patches = (v.image_size // v.patch_size) ** 2 + int(v.cls_token) + v.n_registers  # tokens in the ViT
        vit_params = v.n_layer * (4 * v.n_embd ** 2 + 2 * v.n_embd * round(v.n_embd * v.mlp_ratio))
        vit_per = {'full': 6, 'frozen': 2}.get(vision_mode, 4)
        attn = 4 * v.n_layer * v.n_embd * patches ** 2 * (1 if vision_mode == 'frozen' else 3)  # scores, values
        vit = (vit_per * vit_params + 6 * lora_params[0]) * patches + attn
        hd = d.n_embd // d.n_head
        llm_params = d.n_layer * (d.n_embd * hd * (2 * d.n_head + 2 * d.n_kv_head)
                                  + 3 * d.n_embd * d.intermediate_size)
        T = n_text_tokens + num_image_tokens
        llm_per = 6 if llm_mode == 'full' else 4
        head_tokens = T if n_supervised is None else n_supervised
        llm = ((llm_per * llm_params + 6 * lora_params[1]) * T + llm_per * d.n_embd * d.vocab_size * head_tokens
               + 12 * d.n_layer * d.n_embd * T * T / 2)  # causal attention: half the scores
        c = self.connector
        if c.kind == 'bridge':  # projection, keys and values per image feature; query, output, 4x MLP per text token
            C, N = c.out_dim, patches
            conn = 6 * ((c.in_dim * C + 2 * C * C) * N + 10 * C * C * T) + 12 * C * T * N
        else:
            conn_in = c.in_dim * (c.scale_factor ** 2 if c.kind.startswith('pixel_shuffle') else 1)
            second = c.out_dim ** 2 if c.kind != 'pixel_shuffle_linear' else 0  # the MLP's second layer
            conn = 6 * (conn_in * c.out_dim + second) * num_image_tokens
        return vit + conn + llm


def init_weights(module, std=0.02):
    """GPT-2's N(0, 0.02) for linear layers and embeddings; the patch embedding keeps PyTorch's
    fan-in scaled init."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, llm=None):
        """llm: the language model, kept as it is: a pretrained Decoder, or an HFCausalLM (which a config
        with hf_llm needs). None builds a Decoder from cfg.llm with fresh weights (a checkpoint's weights
        are loaded over them)."""
        super().__init__()
        if llm is None and cfg.hf_llm:
            raise ValueError('this VLMConfig runs a Hugging Face causal LM (hf_llm): hand VLM its pretrained.HFCausalLM')
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.connector = build_connector(cfg.connector)
        pretrained = llm is not None
        self.llm = llm if pretrained else Decoder(cfg.llm)
        for part in (self.vision_tower, self.connector) + (() if pretrained else (self.llm,)):
            part.apply(init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.startswith('llm.') and pretrained:
                continue  # pretrained, or initialised by transformers
            if name.endswith(('o_proj.weight', 'down_proj.weight')):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.llm.n_layer))
            elif name.endswith(('proj.weight', 'fc2.weight')) and name.startswith('vision_tower'):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.vision.n_layer))
        if cfg.connector.out_norm:  # image tokens start at the scale of the LLM's own token embeddings
            projector = getattr(self.connector, 'mlp', self.connector)  # pixel_shuffle wraps an MLPProjector
            with torch.no_grad():
                embed_scale = self.llm.embed_tokens.weight.float().pow(2).mean(-1).sqrt().mean()
                projector.norm.weight.fill_(embed_scale.item())
        self.bridge = cfg.connector.kind == 'bridge'  # image features enter by cross-attention, not as tokens
        v = cfg.vision  # image splitting: what cuts each image into tiles (data.collate, image_inputs)
        self.tiler = Tiler(v.image_size, cfg.max_image_size, v.resample) if cfg.max_image_size else None
        with torch.no_grad():
            self.num_image_tokens = 0 if self.bridge else self.connector(
                torch.zeros(1, self.vision_tower.num_tokens, cfg.vision.n_embd)).shape[1]

    def param_counts(self):
        count = lambda m: sum(p.numel() for p in m.parameters())
        return {'vision_tower': count(self.vision_tower), 'connector': count(self.connector),
                'llm': count(self.llm), 'total': count(self)}

    def image_inputs(self, images):
        """Images, each uint8 (H, W, 3) -> (the tower's input, uint8 (n, h, w, 3) on the CPU; grids for
        encode_chat): with image splitting each image's tiles and global view (tiling.Tiler) and its (rows, cols);
        else the images stacked as they are (the tower resizes them) and grids None."""
        if self.tiler is None:
            return torch.as_tensor(np.stack([np.asarray(torch.as_tensor(im).cpu()) for im in images])), None
        return self.tiler.split(images)

    def image_embeddings(self, images):  # (B, H, W, 3) uint8 -> (B, N', C); the bridge: features (B, N, C_vision)
        # a frozen tower runs without autograd: no activations are kept for a backward that stops at the connector
        trains = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            features = self.vision_tower(images)
        return features if self.bridge else self.connector(features)

    def embed(self, input_ids, images=None, image_embeds=None):
        """Token embeddings with the image embeddings written over the <image> placeholders (or, with
        the bridge, every token embedding attending to the image features)."""
        x = self.llm.embed_tokens(input_ids)  # (B, T, C)
        is_image = input_ids == self.cfg.image_token_id
        if images is None and image_embeds is None:
            return x
        if image_embeds is None:
            image_embeds = self.image_embeddings(images)
        if self.bridge:
            return self.connector(x, image_embeds.to(x.dtype))
        if is_image.sum() != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(f'{int(is_image.sum())} <image> placeholders in the batch but '
                             f'{image_embeds.shape[0]} x {image_embeds.shape[1]} image embeddings')
        return x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))

    def embed_continuation(self, input_ids, image_embeds):
        """Embeddings of tokens that follow a prompt already run (decoding with a KV cache, scoring answers):
        they hold no <image> placeholder, but with the bridge they too attend to the image."""
        return self.embed(input_ids, image_embeds=image_embeds if self.bridge else None)

    def forward(self, input_ids, images=None, attention_mask=None, targets=None, positions=None, segment_ids=None,
                sample_ids=None):
        """With targets (a batch padded on the right, as data.collate makes it): the summed cross-entropy over
        supervised positions (the caller divides by the token count, so gradient accumulation and DDP can
        normalise by the global count).
        Without: logits (B, T, V). positions and segment_ids come with isolated turns, positions and sample_ids
        with packed samples (then images has one image per sample, in the order they stand in the rows)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        if positions is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left or right padding
        # with targets a right-padded batch (data.collate's): its padding carries no loss, so no mask is needed
        if sample_ids is not None and self.bridge:
            raise ValueError('packed samples need image tokens: the bridge gives each row one image to attend to')
        h = self.llm(self.embed(input_ids, images), positions, attention_mask, segment_ids=segment_ids,
                     right_padded=targets is not None, sample_ids=sample_ids)
        if targets is None:
            return self.llm.lm_head(h)
        supervised = targets != IGNORE_INDEX
        logits = self.llm.lm_head(h[supervised]).float()  # only where there is a loss: (n, V)
        return F.cross_entropy(logits, targets[supervised], reduction='sum')

    @torch.no_grad()
    def generate(self, input_ids, images, attention_mask, max_new_tokens=32, eos_id=None,
                 temperature=0.0, top_k=None, top_p=None, use_cache=True, generator=None):
        """Prompts left-padded (B, T) -> new tokens (B, n). temperature 0 is greedy. A row that emits
        eos_id keeps emitting it. use_cache=False recomputes the whole sequence at every step."""
        attention_mask = attention_mask.bool()
        image_embeds = self.image_embeddings(images) if images is not None else None
        ids, mask = input_ids, attention_mask
        cache = self.llm.new_cache() if use_cache else None
        x = self.embed(ids, image_embeds=image_embeds)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = []
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            h = self.llm(x, positions, mask, cache)
            # logits in float32 even under autocast: bf16 rounds logits near 25 to steps of 0.125, and greedy
            # choices flip between near-ties (SmolLM2 answered 'L'Étoile' instead of 'The capital ... Paris.')
            with torch.autocast(h.device.type, enabled=False):
                logits = self.llm.lm_head(h[:, -1].to(self.llm.embed_tokens.weight.dtype)).float()  # (B, V)
            logits[:, self.cfg.image_token_id] = float('-inf')  # a placeholder is never an answer
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt)
            if done.all():
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt[:, None], dtype=torch.bool)], dim=1)
            if use_cache:
                x = self.embed_continuation(nxt[:, None], image_embeds)
                positions = positions[:, -1:] + 1
            else:
                x = self.embed(ids, image_embeds=image_embeds)
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def chat(self, tokenizer, images, prompts, max_new_tokens=32, **sampling):
        """Answer each prompt about its images: images (B, H, W, 3) uint8 (one per prompt) or B lists of
        uint8 (H, W, 3) images; prompts list of str -> list of str. A prompt without '<image>' gets one
        '<image>\\n' per image prepended."""
        device = next(self.parameters()).device
        seqs, pixels = [], []
        for p, ims in zip(prompts, images):
            ims = [ims] if getattr(ims, 'ndim', 0) == 3 else list(ims)
            p = p if '<image>' in p else '<image>\n' * len(ims) + p
            x, grids = self.image_inputs(ims)
            ids, _ = tokenizer.encode_chat([{'role': 'user', 'content': p}], self.num_image_tokens,
                                           add_generation_prompt=True, grids=grids)
            seqs.append(ids)
            pixels.append(x)
        input_ids, mask = left_pad(seqs, tokenizer.pad_id)
        new = self.generate(input_ids.to(device), torch.cat(pixels).to(device), mask.to(device),
                            max_new_tokens=max_new_tokens, eos_id=tokenizer.eot_id, **sampling)
        return [tokenizer.decode(cut_at(row.tolist(), tokenizer.eot_id)) for row in new.cpu()]

    @torch.no_grad()
    def score(self, prompt_ids, images, answers, pad_id=0):
        """The mean log-probability of each answer's tokens after one prompt, for each image: prompt_ids a
        list of T ids (its <image> placeholders included), the same for every image; images (B, H, W, 3)
        uint8, or B images' tiles one image after another (image_inputs; all of one grid, which prompt_ids
        was encoded with); answers K non-empty lists of ids -> (B, K) float32. The image and prompt run once
        per image; their KV cache is then copied to the K answers, which run together, right-padded."""
        device = self.llm.embed_tokens.weight.device
        views = prompt_ids.count(self.cfg.image_token_id) // max(self.num_image_tokens, 1) or 1  # tower inputs a row
        B, K, T, L = len(images) // views, len(answers), len(prompt_ids), max(map(len, answers))
        cont = torch.full((K, L), pad_id, dtype=torch.long)
        valid = torch.zeros((K, L), dtype=torch.bool)
        for k, a in enumerate(answers):
            cont[k, :len(a)], valid[k, :len(a)] = torch.tensor(a), True
        cont, valid = cont.to(device), valid.to(device)
        ids = torch.tensor([prompt_ids] * B, device=device)  # (B, T)
        cache = self.llm.new_cache()
        image_embeds = self.image_embeddings(torch.as_tensor(images).to(device))
        h = self.llm(self.embed(ids, image_embeds=image_embeds), torch.arange(T, device=device).expand(B, T),
                     torch.ones_like(ids, dtype=torch.bool), cache)
        total = self.llm.lm_head(h[:, -1]).float().log_softmax(-1)[:, cont[:, 0]]  # (B, K): the first answer token
        if L > 1:  # the answers' later tokens, all K at once over copies of the prompt's cache
            cache.batch_repeat_interleave(K)  # (B*K, kv, T, hd)
            # answer tokens 0..L-2 as input, (B*K, L-1, C); with the bridge they attend to their image too
            x = self.embed_continuation(cont[:, :-1].repeat(B, 1),
                                        image_embeds.repeat_interleave(K, 0) if self.bridge else None)
            key_valid = torch.cat([torch.ones(B * K, T, dtype=torch.bool, device=device),
                                   valid[:, :-1].repeat(B, 1)], 1)
            pos = torch.arange(T, T + L - 1, device=device).expand(B * K, L - 1)
            logp = self.llm.lm_head(self.llm(x, pos, key_valid, cache)).float().log_softmax(-1)  # (B*K, L-1, V)
            rest = logp.gather(-1, cont[:, 1:].repeat(B, 1)[..., None])[..., 0].view(B, K, L - 1)
            total = total + (rest * valid[None, :, 1:]).sum(-1)
        return total / valid.sum(-1)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) float -> token ids (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float('-inf'))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def left_pad(seqs, pad_id):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = True
    return ids, mask


def cut_at(ids, eos_id):
    return ids[:ids.index(eos_id)] if eos_id in ids else ids
