"""
Every module of glimpse, in plain PyTorch:

    VisionTower   a ViT: patch embedding, learned positions, pre-norm blocks; also holds SigLIP, CLIP and
                  DINOv2 checkpoints (load_pretrained_vision, in the pretrained-weights section at the end)
    Decoder       a Llama-style causal LM: RMSNorm, RoPE, grouped-query attention, SwiGLU
    MLPProjector / PixelShuffleProjector   connectors from image features to LLM embeddings
    VLM           image embeddings spliced in place of <image> placeholders; loss on answers only;
                  generate() with a KV cache
    Tokenizer     the built-in word/byte tokenizer and its chat template
    HFVLM         a whole Hugging Face VLM (SmolVLM, Qwen2-VL...) with its processor, for train_vlm.py hf_vlm=
    SigLIP        stage 1: image tower + text tower (byte transformer or frozen encoder), siglip_loss

                 images (B, H, W, 3) uint8
                          |
                    VisionTower            (B, N, Cv)
                          |
                     connector             (B, N', C)
                          |
    "<bos><|user|><image>...<image> question<|end|><|assistant|> answer<|end|>"
                          |  image embeddings replace the <image> token embeddings
                       Decoder             (B, T, C) -> logits over the vocabulary
"""
import base64
import functools
import json
import math
import os
import re
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
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
    resample: str = 'bicubic'  # or 'bilinear'
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
    kind: str = 'pixel_shuffle'  # 'mlp' (LLaVA-1.5's 2-layer GELU MLP), 'pixel_shuffle' (then the MLP), or
    # 'bridge' (cross-attention from the text embeddings to the image features; no image tokens in the sequence)
    in_dim: int = 128
    out_dim: int = 256
    scale_factor: int = 2  # pixel_shuffle: s x s neighbouring patches become one token
    n_head: int = 8  # bridge: attention heads


class MLPProjector(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PixelShuffleProjector(nn.Module):
    """Space-to-depth on the patch grid (as in Idefics3/SmolVLM): s*s times fewer, s*s times wider tokens."""

    def __init__(self, in_dim, out_dim, scale_factor):
        super().__init__()
        self.s = scale_factor
        self.mlp = MLPProjector(in_dim * scale_factor ** 2, out_dim)

    def forward(self, x):  # (B, N, C)
        B, N, C = x.shape
        h = int(math.isqrt(N))
        s = self.s
        if h * h != N or h % s:
            raise ValueError(f"pixel_shuffle needs a square grid of patches divisible by {s}, got {N} tokens "
                             f"(a kept class token? use connector='mlp')")
        x = x.view(B, h // s, s, h // s, s, C).permute(0, 1, 3, 2, 4, 5)  # (B, h/s, w/s, s, s, C)
        return self.mlp(x.reshape(B, N // s ** 2, s * s * C))


class CrossAttentionBridge(nn.Module):
    """Seed 002's bridge between a frozen vision tower and a frozen LLM: the image features are projected
    to the LLM's width and every text embedding attends to them (pre-norm multi-head cross-attention, then
    a feed-forward), each added through a tanh gate that starts at 0 (as Flamingo's gated cross-attention),
    so at initialisation the LLM sees its own token embeddings unchanged."""

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


def build_connector(cfg: ConnectorConfig):
    if cfg.kind == 'bridge':
        return CrossAttentionBridge(cfg.in_dim, cfg.out_dim, cfg.n_head)
    if cfg.kind == 'mlp':
        return MLPProjector(cfg.in_dim, cfg.out_dim)
    if cfg.kind == 'pixel_shuffle':
        return PixelShuffleProjector(cfg.in_dim, cfg.out_dim, cfg.scale_factor)
    raise ValueError(f"unknown connector '{cfg.kind}': use 'mlp' or 'pixel_shuffle'")


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

    def forward(self, x, cos, sin, mask, cache=None):  # x (B, T, C); mask (B, 1, T, S) bool
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, kv, S, hd)
        rep = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # one mask: causal and padding
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


def attention_mask(key_valid, T, segment_ids=None):
    """(B, S) bool of real keys -> (B, 1, T, S) bool for the last T queries: causal AND real key.
    With segment_ids (B, S) (no cache), a token sees the shared prefix (segment 0) and its own segment.
    Every query also sees itself, so a padding row is never fully masked (no NaN from softmax)."""
    S = key_valid.shape[1]
    q_idx = torch.arange(S - T, S, device=key_valid.device)[:, None]
    k_idx = torch.arange(S, device=key_valid.device)[None, :]
    mask = (k_idx <= q_idx) & key_valid[:, None, None, :]
    if segment_ids is not None:
        seg_q, seg_k = segment_ids[:, None, :, None], segment_ids[:, None, None, :]
        mask = mask & ((seg_k == 0) | (seg_k == seg_q))
    return mask | (k_idx == q_idx)


def current_sdpa_backends():
    b = torch.backends.cuda  # these flags also pick the CPU kernels
    on = {SDPBackend.MATH: b.math_sdp_enabled(), SDPBackend.FLASH_ATTENTION: b.flash_sdp_enabled(),
          SDPBackend.EFFICIENT_ATTENTION: b.mem_efficient_sdp_enabled(), SDPBackend.CUDNN_ATTENTION: b.cudnn_sdp_enabled()}
    return [k for k, v in on.items() if v]


def checkpoint_context():
    """checkpoint's context_fn, called at each forward: the forward as it is, the recomputation with the
    forward's attention backends (checkpoint replays autocast, not sdpa_kernel)."""
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

    def new_cache(self):
        return KVCache(self.cfg.n_layer)

    def forward(self, x, positions, key_valid, cache=None, segment_ids=None):
        """x (B, T, C) input embeddings; positions (B, T); key_valid (B, S) with S = cached + T;
        segment_ids (B, T) for packed independent turns (see attention_mask).
        Returns the final hidden states (B, T, C); apply lm_head for logits."""
        cos, sin = rope_cos_sin(positions, self.cfg.n_embd // self.cfg.n_head, self.cfg.rope_theta)
        mask = attention_mask(key_valid, x.shape[1], segment_ids)
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # non-reentrant: gradients reach the block's adapters even when x needs none (frozen
                # embeddings). Autocast is replayed by checkpoint, the attention backend is not: do it here.
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False, context_fn=checkpoint_context)
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
    # the config.to_dict() of a Hugging Face causal LM run through HFCausalLM; None: the native Decoder
    # (then llm describes it exactly; with HFCausalLM llm only summarises its sizes)
    hf_llm: dict = None

    @classmethod
    def from_dict(cls, d):
        return cls(ViTConfig(**d['vision']), ConnectorConfig(**d['connector']), DecoderConfig(**d['llm']),
                   d['image_token_id'], d.get('hf_llm'))

    def to_dict(self):
        return asdict(self)


def _init_weights(module, std=0.02):
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
        """llm: a pretrained Decoder or HFCausalLM (see load_pretrained_llm), kept as it is; None builds
        one from cfg with fresh weights (a checkpoint's weights are loaded over them)."""
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.connector = build_connector(cfg.connector)
        pretrained = llm is not None
        self.llm = llm if pretrained else HFCausalLM(cfg.hf_llm) if cfg.hf_llm else Decoder(cfg.llm)
        for part in (self.vision_tower, self.connector) + (() if pretrained or cfg.hf_llm else (self.llm,)):
            part.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.startswith('llm.') and (pretrained or cfg.hf_llm):
                continue  # pretrained, or initialised by transformers
            if name.endswith(('o_proj.weight', 'down_proj.weight')):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.llm.n_layer))
            elif name.endswith(('proj.weight', 'fc2.weight')) and name.startswith('vision_tower'):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.vision.n_layer))
        self.bridge = cfg.connector.kind == 'bridge'  # image features enter by cross-attention, not as tokens
        with torch.no_grad():
            self.num_image_tokens = 0 if self.bridge else self.connector(
                torch.zeros(1, self.vision_tower.num_tokens, cfg.vision.n_embd)).shape[1]

    def param_counts(self):
        count = lambda m: sum(p.numel() for p in m.parameters())
        return {'vision_tower': count(self.vision_tower), 'connector': count(self.connector),
                'llm': count(self.llm), 'total': count(self)}

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

    def forward(self, input_ids, images=None, attention_mask=None, targets=None, positions=None, segment_ids=None):
        """With targets: the summed cross-entropy over supervised positions (the caller divides by the
        token count, so gradient accumulation and DDP can normalise by the global count).
        Without: logits (B, T, V). positions and segment_ids come with packed independent turns."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        if positions is None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left or right padding
        h = self.llm(self.embed(input_ids, images), positions, attention_mask, segment_ids=segment_ids)
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
        """Answer one prompt per image: images (B, H, W, 3) uint8, prompts list of str -> list of str.
        A prompt without '<image>' gets it prepended."""
        device = next(self.parameters()).device
        seqs = []
        for p in prompts:
            p = p if '<image>' in p else '<image>\n' + p
            ids, _ = tokenizer.encode_chat([{'role': 'user', 'content': p}], self.num_image_tokens,
                                           add_generation_prompt=True)
            seqs.append(ids)
        input_ids, mask = left_pad(seqs, tokenizer.pad_id)
        new = self.generate(input_ids.to(device), torch.as_tensor(images).to(device), mask.to(device),
                            max_new_tokens=max_new_tokens, eos_id=tokenizer.eot_id, **sampling)
        return [tokenizer.decode(cut_at(row.tolist(), tokenizer.eot_id)) for row in new.cpu()]


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


def training_flops_per_sample(cfg: VLMConfig, n_text_tokens, num_image_tokens, vision_trains=True, llm_trains=True):
    """Matmul FLOPs of one training sample, forward and backward, after the PaLM appendix: per parameter
    per token 2 forward, 2 for the gradient of its input, 2 for the gradient of its weight (plus attention
    scores). A frozen part skips the weight gradient; a frozen vision tower, with nothing trained before
    it, skips its backward altogether. LoRA counts as frozen (its adapters are a rounding error).
    Embedding lookups cost nothing."""
    v, d = cfg.vision, cfg.llm
    patches = (v.image_size // v.patch_size) ** 2 + int(v.cls_token) + v.n_registers  # tokens in the ViT
    vit_params = v.n_layer * (4 * v.n_embd ** 2 + 2 * v.n_embd * round(v.n_embd * v.mlp_ratio))
    vit = (6 * vit_params * patches + 12 * v.n_layer * v.n_embd * patches ** 2) * (1 if vision_trains else 1 / 3)
    hd = d.n_embd // d.n_head
    llm_params = d.n_layer * (d.n_embd * hd * (2 * d.n_head + 2 * d.n_kv_head) + 3 * d.n_embd * d.intermediate_size)
    T = n_text_tokens + num_image_tokens
    llm = (6 if llm_trains else 4) * (llm_params + d.n_embd * d.vocab_size) * T + 12 * d.n_layer * d.n_embd * T * T / 2
    c = cfg.connector
    if c.kind == 'bridge':  # projection and keys/values per image feature; query, output and 4x MLP per text token
        C, N = c.out_dim, patches
        conn = 6 * ((c.in_dim * C + 2 * C * C) * N + 10 * C * C * T) + 12 * C * T * N
    else:
        conn_in = c.in_dim * (c.scale_factor ** 2 if c.kind == 'pixel_shuffle' else 1)
        conn = 6 * (conn_in * c.out_dim + c.out_dim ** 2) * num_image_tokens
    return vit + conn + llm


# -----------------------------------------------------------------------------
# Tokenizer: the built-in one. A Hugging Face tokenizer plugs in behind the same interface:
# encode, decode, encode_chat, pad_id, eot_id, image_token_id, vocab_size, state().

class Tokenizer:
    """'word': a vocabulary of the words in the training texts (lower-cased, punctuation split off).
    'byte': the 256 bytes of UTF-8. Both put the special tokens first.
    Chat template: <bos> then for each turn <|user|> or <|assistant|>, its text, <|end|>."""
    SPECIALS = ('<pad>', '<bos>', '<|end|>', '<|user|>', '<|assistant|>', '<image>', '<unk>')
    WORD_RE = re.compile(r"<image>|[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, kind='word', words=()):
        assert kind in ('word', 'byte'), f"unknown tokenizer '{kind}': use 'word' or 'byte'"
        self.kind = kind
        self.words = list(words)
        self.itos = list(self.SPECIALS) + (self.words if kind == 'word' else [bytes([b]) for b in range(256)])
        self.stoi = {s: i for i, s in enumerate(self.itos) if isinstance(s, str)}
        self.pad_id, self.bos_id, self.eot_id, self.user_id, self.assistant_id, self.image_token_id, self.unk_id = \
            range(len(self.SPECIALS))
        self.vocab_size = len(self.itos)

    @classmethod
    def build(cls, kind, texts):
        words = sorted({w for t in texts for w in cls.WORD_RE.findall(t.lower())} - set(cls.SPECIALS))
        return cls(kind, words if kind == 'word' else ())

    def state(self):
        return {'kind': self.kind, 'words': self.words}

    @classmethod
    def from_state(cls, s):
        if s['kind'] == 'hf':  # a pretrained model's own tokenizer, saved by HFTokenizer.state()
            return HFTokenizer.from_state(s)
        return cls(s['kind'], s['words'])

    def encode(self, text):
        if self.kind == 'word':
            return [self.stoi.get(w, self.unk_id) for w in self.WORD_RE.findall(text.lower())]
        out = []
        for i, part in enumerate(text.split('<image>')):
            out += ([self.image_token_id] if i else []) + [len(self.SPECIALS) + b for b in part.encode()]
        return out

    def decode(self, ids):
        if self.kind == 'byte':
            raw = b''.join(self.itos[i] for i in ids if i >= len(self.SPECIALS))
            return raw.decode('utf-8', errors='replace')
        text = ' '.join(self.itos[i] for i in ids if i >= len(self.SPECIALS) or i == self.unk_id)
        return re.sub(r" ([.,?!;:])", r"\1", text)

    def encode_chat(self, turns, num_image_tokens, add_generation_prompt=False):
        """Turns [{'role', 'content'}] -> (ids, supervised): built segment by segment with a parallel
        mask, so the supervised tokens are exactly the assistant texts and their <|end|>. Each
        '<image>' becomes num_image_tokens placeholders."""
        ids, sup = [self.bos_id], [False]
        for turn in turns:
            assistant = turn['role'] == 'assistant'
            body = []
            for t in self.encode(turn['content']):
                body += [t] * (num_image_tokens if t == self.image_token_id else 1)
            ids += [self.assistant_id if assistant else self.user_id] + body + [self.eot_id]
            sup += [False] + [assistant] * (len(body) + 1)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            sup.append(False)
        return ids, sup


# -----------------------------------------------------------------------------
# pretrained weights: the Llama family into Decoder, any other causal LM through HFCausalLM, and the
# model's own tokenizer and chat template behind the Tokenizer interface

NATIVE_LLMS = ('llama', 'mistral', 'qwen2')  # Hugging Face model_type values whose layout Decoder implements


def resolve_pretrained(source):
    """A local directory, a .gguf file, or a model id in the Hugging Face cache -> (directory, gguf name or None).
    Nothing is downloaded."""
    if source.endswith('.gguf'):
        if not os.path.isfile(source):
            raise SystemExit(f'pretrained error: GGUF file {source} not found')
        return os.path.dirname(os.path.abspath(source)), os.path.basename(source)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, 'config.json')):
            raise SystemExit(f'pretrained error: {source} has no config.json; give a Hugging Face model directory '
                             f'(config.json + *.safetensors), a .gguf file, or a model id in the Hugging Face cache')
        return source, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        return snapshot_download(source, local_files_only=True), None
    except (LocalEntryNotFoundError, HFValidationError):
        raise SystemExit(f"pretrained error: '{source}' is not a local directory, a .gguf file or a model in the Hugging "
                         f"Face cache, and glimpse downloads nothing; download it once on a connected machine with "
                         f"`hf download {source}` (the cache is ~/.cache/huggingface), or point to a local directory")


def read_weights(directory):
    """Every tensor of a Hugging Face model directory: model.safetensors, its shards, or pytorch_model.bin."""
    from safetensors.torch import load_file
    index = os.path.join(directory, 'model.safetensors.index.json')
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.isfile(os.path.join(directory, 'model.safetensors')):
        files = ['model.safetensors']
    elif os.path.isfile(os.path.join(directory, 'pytorch_model.bin')):
        return torch.load(os.path.join(directory, 'pytorch_model.bin'), map_location='cpu', weights_only=True)
    else:
        raise SystemExit(f'pretrained error: no model.safetensors (or shards, or pytorch_model.bin) in {directory}')
    return {k: v for name in files for k, v in load_file(os.path.join(directory, name)).items()}


def decoder_config_from_hf(hf, source):
    """A Llama-family transformers config -> DecoderConfig; refuses what Decoder does not compute."""
    if hf.model_type not in NATIVE_LLMS:
        raise ValueError(f'{source}: model_type {hf.model_type!r} is not one of {NATIVE_LLMS}; use HFCausalLM')
    if hf.hidden_act != 'silu':
        raise ValueError(f"{source}: hidden_act {hf.hidden_act!r}; the native decoder's SwiGLU uses silu")
    # transformers 5 keeps theta and scaling in rope_parameters, earlier versions in rope_theta / rope_scaling
    rope = dict(getattr(hf, 'rope_parameters', None) or getattr(hf, 'rope_scaling', None) or {})
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type != 'default':
        raise ValueError(f"{source}: rope scaling '{rope_type}' is not implemented by the native decoder "
                         f"(only plain RoPE); this checkpoint cannot be loaded into it")
    n_head = hf.num_attention_heads
    head_dim = getattr(hf, 'head_dim', None) or hf.hidden_size // n_head
    if head_dim * n_head != hf.hidden_size:
        raise ValueError(f'{source}: head_dim {head_dim} x {n_head} heads != hidden_size {hf.hidden_size}; '
                         f'the native decoder needs head_dim = hidden_size / heads')
    # sliding-window attention (Mistral, some Qwen2) only differs beyond the window, far past glimpse's sequences
    return DecoderConfig(vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers, n_head=n_head,
                         n_kv_head=getattr(hf, 'num_key_value_heads', None) or n_head, n_embd=hf.hidden_size,
                         intermediate_size=hf.intermediate_size,
                         rope_theta=float(rope.get('rope_theta', getattr(hf, 'rope_theta', 10000.0))),
                         norm_eps=hf.rms_norm_eps, tie_embeddings=bool(hf.tie_word_embeddings),
                         qkv_bias=hf.model_type == 'qwen2' or bool(getattr(hf, 'attention_bias', False)))


def load_decoder(hf_config, state_dict, source):
    """Hugging Face Llama-family weights -> Decoder. Names map one to one after dropping the 'model.' prefix;
    every tensor must be used and every shape must match."""
    cfg = decoder_config_from_hf(hf_config, source)
    decoder = Decoder(cfg)
    sd = {k.removeprefix('model.'): v for k, v in state_dict.items() if not k.endswith('rotary_emb.inv_freq')}
    if cfg.tie_embeddings:  # tied checkpoints may or may not store the shared matrix twice
        sd.pop('lm_head.weight', None)
        if 'embed_tokens.weight' in sd:
            sd['lm_head.weight'] = sd['embed_tokens.weight']
    expected = decoder.state_dict()
    unused, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
    if unused or missing:
        raise ValueError(f'{source}: the weights do not fit the native decoder: unused {unused[:4]}'
                         f'{" ..." if len(unused) > 4 else ""}, missing {missing[:4]}{" ..." if len(missing) > 4 else ""}')
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f'{source}: {k} has shape {tuple(v.shape)}, the config says {tuple(expected[k].shape)}')
    decoder.load_state_dict(sd)
    return decoder


class HFCausalLM(nn.Module):
    """Any transformers causal LM (Phi, Gemma2, GPT-2, ...) behind Decoder's interface: forward from input
    embeddings with positions and a key mask, embed_tokens, lm_head(h) -> logits, new_cache() (the model's
    own Cache). hf_config: a config.to_dict(); model: the loaded model (else built from hf_config)."""

    def __init__(self, hf_config=None, model=None):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM
        if model is None:
            hf_config = dict(hf_config)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_config.pop('model_type'), **hf_config))
        self.model = model
        c = model.config.get_text_config(decoder=True)
        n_head = c.num_attention_heads
        # sizes only, for FLOP counts (approximate for non-SwiGLU MLPs)
        self.cfg = DecoderConfig(vocab_size=model.get_input_embeddings().weight.shape[0], n_layer=c.num_hidden_layers,
                                 n_head=n_head, n_kv_head=getattr(c, 'num_key_value_heads', None) or n_head,
                                 n_embd=c.hidden_size, intermediate_size=getattr(c, 'intermediate_size', None)
                                 or getattr(c, 'n_inner', None) or 4 * c.hidden_size,
                                 tie_embeddings=bool(getattr(c, 'tie_word_embeddings', False)))

    @property
    def embed_tokens(self):
        return self.model.get_input_embeddings()

    def lm_head(self, h):  # (..., C) -> (..., V), with Gemma-2's final logit soft-capping where the model has it
        logits = self.model.get_output_embeddings()(h)
        cap = getattr(self.model.config, 'final_logit_softcapping', None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.model.config)

    def forward(self, x, positions, key_valid, cache=None, segment_ids=None):
        """As Decoder.forward: (B, T, C) embeddings -> (B, T, C) final hidden states."""
        mask = key_valid.long()
        # packed turns: a custom 4D additive mask, which transformers takes as it is (and so ignores sliding
        # windows, 4096 tokens in Gemma-2, far past glimpse's sequences)
        if segment_ids is not None:
            allowed = attention_mask(key_valid, x.shape[1], segment_ids)  # (B, 1, T, S)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
        out = self.model.base_model(inputs_embeds=x, attention_mask=mask, position_ids=positions,
                                    past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state


def mean_rows(weight, n_rows, new_ids):
    """(V, C) embedding or output matrix grown to n_rows; rows new_ids (tokens glimpse added) set to the mean
    of the original rows, so a new token starts as an average token rather than as noise."""
    out = torch.cat([weight, weight.new_zeros(max(0, n_rows - weight.shape[0]), weight.shape[1])])
    out[new_ids] = weight.mean(0)
    return out


def load_pretrained_llm(source):
    """A local directory, Hugging Face cache id or .gguf file -> (tokenizer, llm): an HFTokenizer with <image>
    added, and a Decoder (Llama family) or HFCausalLM (anything else) holding the weights in float32, its
    embedding (and untied output) matrix grown by the added token."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    directory, gguf = resolve_pretrained(source)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(directory, gguf_file=gguf))
    new_ids = [tok.image_token_id] if tok.added_image_token else []
    hf_model = None
    if gguf:  # transformers dequantises GGUF into a float model (and undoes llama.cpp's q/k permutation)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
        hf_config = hf_model.config
    else:
        hf_config = AutoConfig.from_pretrained(directory)
    if hf_config.model_type in NATIVE_LLMS:
        sd = hf_model.state_dict() if hf_model is not None else read_weights(directory)
        cfg = decoder_config_from_hf(hf_config, source)
        n = max(cfg.vocab_size, tok.vocab_size)
        sd = dict(sd)
        for k in ('model.embed_tokens.weight', 'lm_head.weight'):
            if k in sd and not (cfg.tie_embeddings and k == 'lm_head.weight'):
                sd[k] = mean_rows(sd[k].float(), n, new_ids)
        hf_config.vocab_size = n
        return tok, load_decoder(hf_config, sd, source)
    if hf_model is None:
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    n = max(hf_model.get_input_embeddings().weight.shape[0], tok.vocab_size)
    untied = hf_model.get_output_embeddings().weight is not hf_model.get_input_embeddings().weight
    old_in = hf_model.get_input_embeddings().weight.detach().clone()
    old_out = hf_model.get_output_embeddings().weight.detach().clone() if untied else None
    hf_model.resize_token_embeddings(n, mean_resizing=False)
    with torch.no_grad():
        hf_model.get_input_embeddings().weight.copy_(mean_rows(old_in, n, new_ids))
        if untied:
            hf_model.get_output_embeddings().weight.copy_(mean_rows(old_out, n, new_ids))
    return tok, HFCausalLM(model=hf_model)


# A chat template for models without one (GPT-2): "User: ...\nAssistant: ...<eos>\n"
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
                       "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}Assistant:{% endif %}")


class HFTokenizer:
    """A pretrained model's own tokenizer behind the interface of Tokenizer, with '<image>' added as a special
    token. Conversations follow the model's chat template (PLAIN_CHAT_TEMPLATE if it has none); they are
    rendered turn by turn and encoded piece by piece, so the supervised flags mark exactly the assistant
    answers and the end-of-turn token the template puts after them, which is also the generation stop token.
    glimpse pads itself (right for training, left for generation, always masked), so a model without a pad
    token pads with the end-of-turn token."""
    IMAGE = '<image>'

    def __init__(self, hf_tokenizer):
        self.tok = hf_tokenizer
        if not self.tok.chat_template:
            self.tok.chat_template = PLAIN_CHAT_TEMPLATE
        self.added_image_token = self.IMAGE not in self.tok.get_vocab()
        if self.added_image_token:
            self.tok.add_tokens([self.IMAGE], special_tokens=True)
        self.image_token_id = self.tok.convert_tokens_to_ids(self.IMAGE)
        self.vocab_size = len(self.tok)
        self.eot_id = self._end_of_turn()
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eot_id

    def _render(self, turns, add_generation_prompt):
        return self.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _end_of_turn(self):
        """The first special token the template writes after an assistant answer (<|im_end|>, <end_of_turn>...)."""
        text = self._render([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'PROBE'}], False)
        special = set(self.tok.all_special_ids) | {i for i, t in self.tok.added_tokens_decoder.items() if t.special}
        for i in self.encode(text[text.rindex('PROBE') + len('PROBE'):]):
            if i in special:
                return i
        raise ValueError(f'the chat template of {self.tok.name_or_path} puts no special token after an assistant '
                         f'answer, so there is nothing to stop generation at')

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)  # the template writes any <bos> itself

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_chat(self, turns, num_image_tokens, add_generation_prompt=False):
        """As Tokenizer.encode_chat: (ids, supervised). Each turn is the text its rendering adds to the
        rendering of the turns before it; an assistant turn splits into the generation prompt, then the
        answer and the end-of-turn token (supervised), then what follows (a newline)."""
        ids, sup, done = [], [], ''

        def add(text, supervised):
            for t in self.encode(text):
                n = num_image_tokens if t == self.image_token_id else 1
                ids.extend([t] * n)
                sup.extend([supervised] * n)

        for k in range(len(turns) + add_generation_prompt):
            text = self._render(turns[:k + 1], k == len(turns))
            if not text.startswith(done):
                raise ValueError(f'the chat template of {self.tok.name_or_path} renders turn {k} differently once '
                                 f'more turns follow, so glimpse cannot encode conversations turn by turn')
            piece = text[len(done):]
            if k < len(turns) and turns[k]['role'] == 'assistant':
                header = self._render(turns[:k], True)[len(done):]
                if not piece.startswith(header):
                    raise ValueError(f'the chat template of {self.tok.name_or_path} does not start an assistant '
                                     f'turn with its generation prompt {header!r}')
                add(header, False)
                body = self.encode(piece[len(header):])
                if self.eot_id not in body:
                    raise ValueError(f'the chat template of {self.tok.name_or_path} ends assistant turn {k} without '
                                     f'the end-of-turn token {self.tok.convert_ids_to_tokens(self.eot_id)!r}')
                end = body.index(self.eot_id) + 1
                ids.extend(body)
                sup.extend([True] * end + [False] * (len(body) - end))
            else:
                add(piece, False)
            done = text
        return ids, sup

    def state(self):
        """The tokenizer's files (base64 strings), so a checkpoint is self-contained and loads with weights_only."""
        with tempfile.TemporaryDirectory() as d:
            self.tok.save_pretrained(d)
            files = {}
            for name in os.listdir(d):
                with open(os.path.join(d, name), 'rb') as f:
                    files[name] = base64.b64encode(f.read()).decode()
        return {'kind': 'hf', 'files': files}

    @classmethod
    def from_state(cls, s):
        from transformers import AutoTokenizer
        with tempfile.TemporaryDirectory() as d:
            for name, data in s['files'].items():
                with open(os.path.join(d, name), 'wb') as f:
                    f.write(base64.b64decode(data))
            return cls(AutoTokenizer.from_pretrained(d))


# -----------------------------------------------------------------------------
# pretrained weights: a whole Hugging Face VLM (train_vlm.py hf_vlm=...), its processor and chat template
# standing in for glimpse's tokenizer

class HFProcessor:
    """A Hugging Face VLM's processor behind the parts of the Tokenizer interface the training scripts use.
    Conversations are rendered by the model's own chat template and images expanded into image tokens by
    the processor, as the model was trained (training.hf_collate builds the batches)."""

    def __init__(self, processor, source):
        self.processor, self.tokenizer, self.source = processor, processor.tokenizer, source
        if not getattr(processor, 'chat_template', None):
            raise SystemExit(f'pretrained error: the processor of {source} has no chat template; glimpse renders '
                             f'conversations with the model\'s own one (use an instruction-tuned model)')
        if not self.tokenizer.is_fast:  # the answer tokens are found through character offsets
            raise SystemExit(f'pretrained error: {source} has no fast tokenizer (tokenizer.json); hf_vlm needs one')
        self.image_token = getattr(processor, 'image_token', None)  # what its chat template writes for an image
        if self.image_token is None:
            raise SystemExit(f'pretrained error: the processor of {source} names no image token; hf_vlm needs an '
                             f'image-text-to-text processor (SmolVLM, Idefics3, Qwen2-VL...)')
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.vocab_size = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id

    @staticmethod
    def messages(turns):
        """glimpse turns ('<image>' marks where the sample's one image goes) -> chat-template messages.
        The image stays in the first user turn even when the marker is missing (a bare question)."""
        out, placed = [], False
        for t in turns:
            text = t['content']
            if t['role'] == 'user' and not placed:
                before, _, after = text.partition('<image>') if '<image>' in text else ('', '', text)
                content = [{'type': 'text', 'text': before.strip()}] if before.strip() else []
                content += [{'type': 'image'}, {'type': 'text', 'text': after.strip()}]
                placed = True
            else:
                content = [{'type': 'text', 'text': text.replace('<image>', '').strip()}]
            out.append({'role': t['role'], 'content': content})
        return out

    def render(self, messages, add_generation_prompt=False):
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def state(self):
        return {'kind': 'hf_processor', 'source': self.source}  # the base model's processor: nothing to store


class HFVLM(nn.Module):
    """A Hugging Face image-text-to-text model (SmolVLM / Idefics3, Qwen2-VL, ...) behind the interface
    train_vlm.py uses: forward(**batch) -> the summed cross-entropy of the supervised targets (as VLM.forward),
    chat(), param_counts(), vision_tower and llm (the parts the training modes apply to) and cfg (sizes only,
    for FLOP counts). Weights are held in float32 (autocast lowers them), as load_pretrained_llm's."""
    num_image_tokens = None  # per image, as the processor expands it (train_vlm.py counts them per batch)

    def __init__(self, source, trust_remote_code=False):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor
        directory, gguf = resolve_pretrained(source)
        if gguf:
            raise SystemExit(f'pretrained error: hf_vlm={source} is a .gguf file; give a Hugging Face VLM directory')
        try:
            processor = AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)
            self.model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32,
                                                                     trust_remote_code=trust_remote_code)
        except (ValueError, OSError) as e:  # not an image-text-to-text model, or code it would have to run
            first = (str(e).strip().splitlines() or [''])[0][:200]
            raise SystemExit(f'pretrained error: cannot load {source} as an image-text-to-text model with its '
                             f'processor ({type(e).__name__}: {first})')
        self.processor = HFProcessor(processor, source)
        if self.vision_tower is self.model or self.llm is self.model:
            raise SystemExit(f'pretrained error: cannot tell the vision tower and language model of {source} apart')
        self.cfg = hf_vlm_sizes(self.model.config, self.processor.image_token_id)

    # properties, not attributes: the parts stay reachable through self.model only (one name per tensor)
    @property
    def vision_tower(self):
        return self.model.get_encoder('image')

    @property
    def llm(self):
        return self.model.get_decoder()

    def param_counts(self):
        count = lambda m: sum(p.numel() for p in m.parameters())
        vision, llm, total = count(self.vision_tower), count(self.llm), count(self)
        return {'vision_tower': vision, 'llm': llm, 'other': total - vision - llm, 'total': total}

    def forward(self, input_ids, attention_mask=None, targets=None, **inputs):
        """inputs: what the processor made of the images (pixel_values, ...). With targets: the summed
        cross-entropy over supervised positions (the caller normalises); without: logits (B, T, V)."""
        h = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  **inputs).last_hidden_state  # (B, T, C)
        head = self.model.get_output_embeddings()
        if targets is None:
            return head(h)
        supervised = targets != IGNORE_INDEX
        logits = head(h[supervised]).float()  # only where there is a loss: (n, V)
        return F.cross_entropy(logits, targets[supervised], reduction='sum')

    @torch.no_grad()
    def chat(self, processor, images, prompts, max_new_tokens=32, system='', temperature=0.0, top_k=None,
             top_p=None, generator=None):
        """As VLM.chat: one prompt per image (uint8 arrays or PIL images) -> answers, via the model's generate().
        Sampling draws from the global RNG (transformers takes no generator)."""
        import numpy as np
        from PIL import Image
        device = next(self.parameters()).device
        head = [{'role': 'system', 'content': [{'type': 'text', 'text': system}]}] if system else []
        texts = [processor.render(head + processor.messages([{'role': 'user', 'content': p}]), True) for p in prompts]
        pil = [[im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))] for im in images]
        processor.tokenizer.padding_side = 'left'
        batch = processor.processor(text=texts, images=pil, return_tensors='pt', padding=True).to(device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0) \
            if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=processor.pad_id, **sampling)
        return [t.strip() for t in processor.tokenizer.batch_decode(out[:, batch['input_ids'].shape[1]:],
                                                                    skip_special_tokens=True)]


def hf_vlm_sizes(config, image_token_id):
    """A VLMConfig summarising a Hugging Face VLM's sizes, for training_flops_per_sample only (approximate:
    one image crop, an MLP connector); the model itself is config['hf_vlm']."""
    t, v = config.get_text_config(decoder=True), config.vision_config
    width = getattr(v, 'embed_dim', None) or v.hidden_size  # Qwen2-VL: embed_dim (its hidden_size is the output)
    heads = getattr(v, 'num_heads', None) or v.num_attention_heads
    mlp = getattr(v, 'intermediate_size', None)
    vision = ViTConfig(image_size=getattr(v, 'image_size', v.patch_size), patch_size=v.patch_size,
                       n_layer=getattr(v, 'depth', None) or v.num_hidden_layers, n_head=heads, n_embd=width,
                       mlp_ratio=mlp / width if mlp else getattr(v, 'mlp_ratio', 4.0), source=config.name_or_path)
    llm = DecoderConfig(vocab_size=t.vocab_size, n_layer=t.num_hidden_layers, n_head=t.num_attention_heads,
                        n_kv_head=getattr(t, 'num_key_value_heads', None) or t.num_attention_heads,
                        n_embd=t.hidden_size, intermediate_size=getattr(t, 'intermediate_size', 4 * t.hidden_size))
    return VLMConfig(vision=vision, connector=ConnectorConfig(kind='mlp', in_dim=width, out_dim=t.hidden_size),
                     llm=llm, image_token_id=image_token_id)


# -----------------------------------------------------------------------------
# pretrained weights: a Hugging Face checkpoint's tensors renamed into the native modules, every
# tensor accounted for and every shape checked

VISION_FAMILIES = {'siglip_vision_model': 'siglip', 'clip_vision_model': 'clip', 'dinov2': 'dinov2',
                   'dinov2_with_registers': 'dinov2'}
HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
                  'quick_gelu': 'quick_gelu'}


def image_preprocessing(model_dir):
    """The ViTConfig fields of the checkpoint's preprocessor_config.json: size, resize mode, mean/std."""
    path = os.path.join(model_dir, 'preprocessor_config.json')
    if not os.path.exists(path):
        raise SystemExit(f'vision error: {path} not found; the tower needs it for image size, resizing and '
                         f'mean/std (save the model\'s image processor there with save_pretrained)')
    with open(path) as f:
        p = json.load(f)
    side = lambda v: v if isinstance(v, int) else v.get('height', v.get('shortest_edge'))
    if p.get('do_rescale', True) and abs(p.get('rescale_factor', 1 / 255) - 1 / 255) > 1e-9:
        raise SystemExit(f"vision error: {path}: rescale_factor {p['rescale_factor']} (glimpse expects 1/255)")
    resample = {2: 'bilinear', 3: 'bicubic'}.get(p.get('resample', 3))
    if resample is None:
        raise SystemExit(f"vision error: {path}: resample={p['resample']}; glimpse resizes bilinear (2) or bicubic (3)")
    size, crop = p.get('size', 224), p.get('crop_size')
    out = dict(resample=resample)
    if p.get('do_center_crop') and crop is not None:  # shorter side to size, then the centre crop (CLIP, DINOv2)
        out.update(image_size=side(crop), resize_shortest=side(size))
    elif isinstance(size, dict) and 'shortest_edge' in size:
        raise SystemExit(f'vision error: {path}: shortest_edge resize without a center crop gives images of '
                         f'varying shape; glimpse needs a fixed size')
    else:  # both sides to size (SigLIP)
        out.update(image_size=side(size))
    if p.get('do_normalize', True):
        out.update(image_mean=tuple(p['image_mean']), image_std=tuple(p['image_std']))
    else:
        out.update(image_mean=(0.0, 0.0, 0.0), image_std=(1 / 255,) * 3)  # pixels as 0..1 * 255 / 255
    return out


def interpolate_positions(pos, grid, antialias):
    """(1, g*g, C) position table -> (1, grid*grid, C), bicubic on the 2D grid, in fp32 as DINOv2 does."""
    g, C = int(math.isqrt(pos.shape[1])), pos.shape[2]
    x = pos.reshape(1, g, g, C).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode='bicubic', align_corners=False, antialias=antialias)
    return x.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, C)


def blocks_kept(layer, n_layer, source):
    """How many blocks of an n_layer tower vision_layer keeps: -1 all, -2 all but the last, k > 0 the first k."""
    n_keep = layer if layer > 0 else n_layer + 1 + layer
    if not 1 <= n_keep <= n_layer:
        raise SystemExit(f'vision error: vision_layer={layer} but {source} has {n_layer} blocks '
                         f'(use -{n_layer}..-1 or 1..{n_layer})')
    return n_keep


def load_pretrained_vision(source, layer=-1, keep_cls=False):
    """A SigLIP, CLIP or DINOv2 vision tower (or the vision half of a CLIPModel / SiglipModel) from a local
    directory or a model id in the Hugging Face cache, as (ViTConfig, state_dict of VisionTower).
    layer: whose output feeds the connector, as an index into Hugging Face's hidden_states (-1: the
    last block, with the final LayerNorm SigLIP and DINOv2 apply to last_hidden_state; -2: the
    penultimate block's raw output, as LLaVA takes from CLIP). The blocks after it are not built."""
    model_dir, gguf = resolve_pretrained(source)
    if gguf:
        raise SystemExit(f'vision error: {source} is a GGUF file; vision= takes a SigLIP, CLIP or DINOv2 directory')
    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained(model_dir)
    hf = getattr(hf, 'vision_config', hf)  # CLIPModel / SiglipModel: the vision half
    family = VISION_FAMILIES.get(hf.model_type)
    if family is None:
        raise SystemExit(f"vision error: {model_dir}/config.json is a '{hf.model_type}' model; vision= takes "
                         f"SigLIP, CLIP or DINOv2 checkpoints ({', '.join(VISION_FAMILIES)})")
    if family == 'dinov2' and getattr(hf, 'use_swiglu_ffn', False):
        raise SystemExit(f'vision error: {model_dir}: DINOv2 with a SwiGLU MLP (giant) is not supported')
    if hf.hidden_act not in HF_ACTIVATIONS:
        raise SystemExit(f"vision error: {model_dir}: activation '{hf.hidden_act}' is not supported")
    L = hf.num_hidden_layers
    n_keep = blocks_kept(layer, L, source)
    last = n_keep == L
    C = hf.hidden_size
    mlp = hf.intermediate_size if family != 'dinov2' else round(C * hf.mlp_ratio)
    cls = family != 'siglip'
    cfg = ViTConfig(patch_size=hf.patch_size, n_layer=n_keep, n_head=hf.num_attention_heads, n_embd=C,
                    mlp_ratio=mlp / C, norm_eps=hf.layer_norm_eps, act=HF_ACTIVATIONS[hf.hidden_act],
                    patch_bias=family != 'clip', cls_token=cls, n_registers=getattr(hf, 'num_register_tokens', 0),
                    pre_norm=family == 'clip', post_norm=last and family != 'clip',
                    layer_scale=1.0 if family == 'dinov2' else 0.0, keep_cls=keep_cls and cls,
                    source=os.path.abspath(source) if model_dir == source else f'{source} ({model_dir})', **image_preprocessing(model_dir))
    if keep_cls and not cls:
        raise SystemExit(f'vision error: vision_cls=True but {source} ({family}) has no class token')

    tensors = read_weights(model_dir)
    prefix = next((p for p in ('vision_model.', 'dinov2.', 'dinov2_with_registers.', '')
                   if f'{p}embeddings.patch_embedding.weight' in tensors
                   or f'{p}embeddings.patch_embeddings.projection.weight' in tensors), None)
    if prefix is None:
        raise SystemExit(f'vision error: no patch embedding among the tensors in {model_dir}; not a {family} checkpoint?')
    # native name -> checkpoint name(s); q, k, v are concatenated into one projection
    if family == 'dinov2':
        m = {'patch_embed.weight': 'embeddings.patch_embeddings.projection.weight',
             'patch_embed.bias': 'embeddings.patch_embeddings.projection.bias',
             'cls_token': 'embeddings.cls_token', 'pos_embed': 'embeddings.position_embeddings'}
        if cfg.n_registers:
            m['registers'] = 'embeddings.register_tokens'
        if last:
            m.update({'ln_post.weight': 'layernorm.weight', 'ln_post.bias': 'layernorm.bias'})
        block = {'ln1': 'norm1', 'ln2': 'norm2', 'proj': 'attention.output.dense', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2',
                 'qkv': ['attention.attention.query', 'attention.attention.key', 'attention.attention.value']}
        layers, unused = 'encoder.layer', ('embeddings.mask_token',)  # mask_token: for masked-image pretraining
    else:
        m = {'patch_embed.weight': 'embeddings.patch_embedding.weight',
             'pos_embed': 'embeddings.position_embedding.weight'}
        if family == 'siglip':
            m['patch_embed.bias'] = 'embeddings.patch_embedding.bias'
            if last:
                m.update({'ln_post.weight': 'post_layernorm.weight', 'ln_post.bias': 'post_layernorm.bias'})
        else:
            m.update({'cls_token': 'embeddings.class_embedding', 'ln_pre.weight': 'pre_layrnorm.weight',
                      'ln_pre.bias': 'pre_layrnorm.bias'})
        block = {'ln1': 'layer_norm1', 'ln2': 'layer_norm2', 'proj': 'self_attn.out_proj', 'fc1': 'mlp.fc1',
                 'fc2': 'mlp.fc2', 'qkv': ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj']}
        # SigLIP's attention-pooling head and CLIP's post_layernorm make the pooled output only
        layers, unused = 'encoder.layers', ('head.', 'post_layernorm.')
    for i in range(n_keep):
        for nat, src in block.items():
            for w in ('weight', 'bias'):
                m[f'blocks.{i}.{nat}.{w}'] = [f'{layers}.{i}.{s}.{w}' for s in src] if isinstance(src, list) \
                    else f'{layers}.{i}.{src}.{w}'
        if family == 'dinov2':
            m[f'blocks.{i}.ls1'] = f'{layers}.{i}.layer_scale1.lambda1'
            m[f'blocks.{i}.ls2'] = f'{layers}.{i}.layer_scale2.lambda1'

    with torch.device('meta'):
        expected = VisionTower(cfg).state_dict()
    state, used = {}, set()
    for nat, src in m.items():
        names = [prefix + s for s in (src if isinstance(src, list) else [src])]
        for n in names:
            if n not in tensors:
                raise SystemExit(f'vision error: tensor {n} (for {nat}) not found in {model_dir}')
        used.update(names)
        t = torch.cat([tensors[n] for n in names]) if len(names) > 1 else tensors[names[0]]
        if nat == 'cls_token':
            t = t.reshape(1, 1, C)
        elif nat == 'pos_embed':
            t = t.reshape(1, -1, C)
            grid = cfg.image_size // cfg.patch_size
            if t.shape[1] != grid * grid + cls:  # DINOv2: trained at 518 px, used at 224
                head = t[:, :int(cls)]
                t = torch.cat([head, interpolate_positions(t[:, int(cls):], grid,
                                                           hf.model_type == 'dinov2_with_registers')], dim=1)
        if tuple(t.shape) != tuple(expected[nat].shape):
            raise SystemExit(f'vision error: {names[0]} in {model_dir} has shape {tuple(t.shape)}, the native '
                             f'{nat} needs {tuple(expected[nat].shape)}')
        state[nat] = t.float().contiguous()
    if set(state) != set(expected):
        raise SystemExit(f'vision error: no checkpoint tensor for {sorted(set(expected) - set(state))}')
    beyond = tuple(f'{prefix}{layers}.{i}.' for i in range(n_keep, L))  # blocks after the selected layer
    left = [k for k in tensors if k.startswith(prefix) and k not in used and not k.startswith(beyond)
            and not k[len(prefix):].startswith(unused + (('layernorm.',) if family == 'dinov2' and not last else ()))]
    if left:
        raise SystemExit(f'vision error: {len(left)} tensors of {model_dir} not mapped, e.g. {left[0]}')
    return cfg, state


# -----------------------------------------------------------------------------
# SigLIP (stage 1, train_siglip.py): an image tower and a text tower meet in a shared embedding
# space, trained with the sigmoid loss of Zhai et al. 2023. The image tower then feeds the VLM.

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
    """torchvision's ResNet-50 from scratch (seed 000's image tower), globally average-pooled: (B, 2048)."""

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
                m.apply(_init_weights)  # the ResNet keeps torchvision's init
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


# -----------------------------------------------------------------------------
# pretrained weights

class FrozenTextEncoder:
    """A pretrained text model, frozen: the mean of its hidden states over the real tokens.
    path: a local transformers dir (e.g. all-MiniLM-L6-v2) or a .gguf file (e.g. SmolLM2; transformers
    dequantizes it). Loaded with AutoModel, so a causal LM comes without its LM head.
    An encoder (BERT-like) is pooled at its last layer, as sentence encoders are trained to be. A causal
    LM is pooled at its middle layer, leaving out the first token: the last layers are shaped for
    predicting the next token, and the first token is where attention sinks, with a hidden state ~100x
    larger than the others that swamps a mean. On shapes captions (SmolLM2, class-mean probe): last layer
    with every token 80% shape / 63% colour; middle layer without the first token 100% / 100%.
    layer: a hidden_states index to use instead (0 = the default above; -1 = the last layer)."""

    def __init__(self, path, device='cpu', layer=0):
        from transformers import AutoModel, AutoTokenizer
        path, gguf = resolve_pretrained(path)
        kw = {'gguf_file': gguf} if gguf else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        if self.tokenizer.pad_token is None:  # Llama-style tokenizers have none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = 'right'
        self.model = AutoModel.from_pretrained(path, **kw).to(device).eval().requires_grad_(False)
        cfg = self.model.config
        # a GGUF file holds a language model; its config names no architectures
        self.causal = bool(gguf) or any(a.endswith('ForCausalLM') for a in cfg.architectures or []) or \
            getattr(cfg, 'is_decoder', False)
        self.layer = layer or (cfg.num_hidden_layers // 2 if self.causal else -1)
        blocks = getattr(self.model, 'layers', None)  # a decoder's blocks (Llama-style models)
        if self.layer > 0 and isinstance(blocks, nn.ModuleList) and self.layer + 1 < len(blocks):
            # the blocks after the pooled layer never change it: drop them (SmolLM2 at layer 15: 2x faster).
            # One more is kept: transformers returns the last hidden state after the final norm.
            self.model.layers = blocks[:self.layer + 1]
        self.dim = cfg.hidden_size
        self.device = device

    @torch.no_grad()
    def __call__(self, texts, batch_size=64):  # list of str -> (N, dim) float32
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        out = torch.empty(len(texts), self.dim)
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, return_tensors='pt').to(self.device)
            h = self.model(**enc, output_hidden_states=True).hidden_states[self.layer]  # (B, T, dim)
            mask = enc['attention_mask'].bool()
            if self.causal:  # drop the attention sink, except from a text of one token (a mean needs one)
                mask[:, 0] &= mask.sum(1) == 1
            out[idx] = masked_mean(h.float(), mask).cpu()
        return out
