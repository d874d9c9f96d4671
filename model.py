"""
Every module of glimpse, in plain PyTorch:

    VisionTower   a ViT: patch embedding, learned positions, pre-norm blocks
    Decoder       a Llama-style causal LM: RMSNorm, RoPE, grouped-query attention, SwiGLU
    MLPProjector / PixelShuffleProjector   connectors from image features to LLM embeddings
    VLM           image embeddings spliced in place of <image> placeholders; loss on answers only;
                  generate() with a KV cache
    Tokenizer     the built-in word/byte tokenizer and its chat template
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
import math
import os
import re
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    image_mean: tuple = (0.5, 0.5, 0.5)  # images are normalised with what the tower was trained on
    image_std: tuple = (0.5, 0.5, 0.5)


class ViTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.qkv = nn.Linear(C, 3 * C)
        self.proj = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C, eps=cfg.norm_eps)
        hidden = int(C * cfg.mlp_ratio)
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x, mask=None):  # x (B, N, C); mask (B, 1, 1, N) bool of real tokens, for text
        B, N, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, hd), every token sees every token
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def sincos_2d(grid, dim):
    """(grid*grid, dim) 2D sine-cosine position table: a quarter of the channels each for sin and cos
    of the row and of the column. The learned positions start here rather than at noise, so patches
    know where they are from the first step (as in Beyer et al. 2022, "Better plain ViT baselines")."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class VisionTower(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        k = cfg.patch_size + 2 * cfg.patch_overlap  # overlapping patches: an object cut by a patch border
        self.patch_embed = nn.Conv2d(3, cfg.n_embd, k, stride=cfg.patch_size, padding=cfg.patch_overlap)
        self.pos_embed = nn.Parameter(sincos_2d(int(math.isqrt(self.num_patches)), cfg.n_embd)[None])
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_post = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.register_buffer('mean', torch.tensor(cfg.image_mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer('std', torch.tensor(cfg.image_std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images):  # (B, H, W, 3) uint8
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std  # (B, 3, H, W)
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


# -----------------------------------------------------------------------------
# Connectors: image features (B, N, Cv) -> LLM input embeddings (B, N', C)

@dataclass
class ConnectorConfig:
    kind: str = 'pixel_shuffle'  # 'mlp' (LLaVA-1.5's 2-layer GELU MLP) or 'pixel_shuffle' (then the MLP)
    in_dim: int = 128
    out_dim: int = 256
    scale_factor: int = 2  # pixel_shuffle: s x s neighbouring patches become one token


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
        x = x.view(B, h // s, s, h // s, s, C).permute(0, 1, 3, 2, 4, 5)  # (B, h/s, w/s, s, s, C)
        return self.mlp(x.reshape(B, N // s ** 2, s * s * C))


def build_connector(cfg: ConnectorConfig):
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

    def forward(self, x, positions, key_valid, cache=None, segment_ids=None):
        """x (B, T, C) input embeddings; positions (B, T); key_valid (B, S) with S = cached + T;
        segment_ids (B, T) for packed independent turns (see attention_mask).
        Returns the final hidden states (B, T, C); apply lm_head for logits."""
        cos, sin = rope_cos_sin(positions, self.cfg.n_embd // self.cfg.n_head, self.cfg.rope_theta)
        mask = attention_mask(key_valid, x.shape[1], segment_ids)
        for layer in self.layers:
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

    @classmethod
    def from_dict(cls, d):
        return cls(ViTConfig(**d['vision']), ConnectorConfig(**d['connector']), DecoderConfig(**d['llm']),
                   d['image_token_id'])

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
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.connector = build_connector(cfg.connector)
        self.llm = Decoder(cfg.llm)
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith(('o_proj.weight', 'down_proj.weight')):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.llm.n_layer))
            elif name.endswith(('proj.weight', 'fc2.weight')) and name.startswith('vision_tower'):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.vision.n_layer))
        with torch.no_grad():
            self.num_image_tokens = self.connector(torch.zeros(1, self.vision_tower.num_patches,
                                                               cfg.vision.n_embd)).shape[1]

    def param_counts(self):
        count = lambda m: sum(p.numel() for p in m.parameters())
        return {'vision_tower': count(self.vision_tower), 'connector': count(self.connector),
                'llm': count(self.llm), 'total': count(self)}

    def image_embeddings(self, images):  # (B, H, W, 3) uint8 -> (B, N', C)
        return self.connector(self.vision_tower(images))

    def embed(self, input_ids, images=None, image_embeds=None):
        """Token embeddings with the image embeddings written over the <image> placeholders."""
        x = self.llm.embed_tokens(input_ids)  # (B, T, C)
        is_image = input_ids == self.cfg.image_token_id
        if images is None and image_embeds is None:
            return x
        if image_embeds is None:
            image_embeds = self.image_embeddings(images)
        if is_image.sum() != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(f'{int(is_image.sum())} <image> placeholders in the batch but '
                             f'{image_embeds.shape[0]} x {image_embeds.shape[1]} image embeddings')
        return x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))

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
        cache = KVCache(self.cfg.llm.n_layer) if use_cache else None
        x = self.embed(ids, image_embeds=image_embeds)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = []
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            h = self.llm(x, positions, mask, cache)
            logits = self.llm.lm_head(h[:, -1]).float()  # (B, V)
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
                x = self.llm.embed_tokens(nxt[:, None])
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


def training_flops_per_sample(cfg: VLMConfig, n_text_tokens, num_image_tokens):
    """Matmul FLOPs of one training sample, forward and backward (6 per parameter per token, plus
    attention scores), after the PaLM appendix. Embedding lookups cost nothing."""
    v, d = cfg.vision, cfg.llm
    patches = (v.image_size // v.patch_size) ** 2
    vit_params = v.n_layer * (4 * v.n_embd ** 2 + 2 * v.n_embd * int(v.n_embd * v.mlp_ratio))
    vit = 6 * vit_params * patches + 12 * v.n_layer * v.n_embd * patches ** 2
    hd = d.n_embd // d.n_head
    llm_params = d.n_layer * (d.n_embd * hd * (2 * d.n_head + 2 * d.n_kv_head) + 3 * d.n_embd * d.intermediate_size)
    T = n_text_tokens + num_image_tokens
    llm = 6 * (llm_params + d.n_embd * d.vocab_size) * T + 12 * d.n_layer * d.n_embd * T * T / 2
    c = cfg.connector
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

    def forward(self, ids, mask):  # ids (B, T), mask (B, T) bool -> (B, C)
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


def siglip_loss(img_emb, txt_emb, log_t, bias, distributed=False):
    """The sigmoid loss (Zhai et al. 2023, eq. 1) of unit-norm img_emb (B, D) and txt_emb (B, D): every
    image against every text, -log sigmoid(z * (exp(t') cos + b)) with z = +1 for the image's own text and
    -1 for all others, summed over pairs and averaged over images. distributed=True: each rank's images
    meet the texts of all ranks (gathered with their gradient; rank r's own texts sit at rows r*B..);
    dividing by the local B makes DDP's mean over ranks equal one process on the global batch."""
    B = img_emb.shape[0]
    offset = 0
    if distributed:
        import torch.distributed as dist
        txt_emb = gather_with_grad(txt_emb)  # (W*B, D)
        offset = dist.get_rank() * B
    with torch.autocast(img_emb.device.type, enabled=False):  # logits and loss in fp32
        logits = img_emb.float() @ txt_emb.float().T * log_t.float().exp() + bias.float()  # (B, W*B)
        z = torch.full_like(logits, -1.0)
        z[torch.arange(B), offset + torch.arange(B)] = 1.0
        return -F.logsigmoid(z * logits).sum() / B


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

    def forward(self, images, ids=None, mask=None, features=None, distributed=False):
        return siglip_loss(self.encode_image(images), self.encode_text(ids, mask, features),
                           self.log_t, self.bias, distributed)


# -----------------------------------------------------------------------------
# pretrained weights

class FrozenTextEncoder:
    """A pretrained text model, frozen: the mean of its last hidden states over the real tokens.
    path: a local transformers dir (e.g. all-MiniLM-L6-v2) or a .gguf file (e.g. SmolLM2; transformers
    dequantizes it). Loaded with AutoModel, so a causal LM comes without its LM head."""

    def __init__(self, path, device='cpu'):
        from transformers import AutoModel, AutoTokenizer
        if not os.path.exists(path):
            raise SystemExit(f'text tower error: {path} not found; give a local model dir or a .gguf file')
        kw = {}
        if path.endswith('.gguf'):
            path, kw = os.path.dirname(os.path.abspath(path)), {'gguf_file': os.path.basename(path)}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        if self.tokenizer.pad_token is None:  # Llama-style tokenizers have none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = 'right'
        self.model = AutoModel.from_pretrained(path, **kw).to(device).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size
        self.device = device

    @torch.no_grad()
    def __call__(self, texts, batch_size=64):  # list of str -> (N, dim) float32
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        out = torch.empty(len(texts), self.dim)
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, return_tensors='pt').to(self.device)
            h = self.model(**enc).last_hidden_state  # (B, T, dim)
            out[idx] = masked_mean(h.float(), enc['attention_mask'].bool()).cpu()
        return out
