"""
LoRA and QLoRA, by hand.

LoRA (Hu et al. 2021): a frozen linear layer W gets a trainable low-rank update,
    y = W x + scale * B A dropout(x),   A (r, in) random, B (out, r) zero, scale = alpha / r
so a freshly wrapped layer computes exactly what the base did. rsLoRA (Kalajdzievski 2023) uses
scale = alpha / sqrt(r), which keeps the update's size stable as r grows.
QLoRA (Dettmers et al. 2023): the frozen W is stored in 4 bits (bitsandbytes Linear4bit: NF4 or FP4,
optionally with double-quantised block scales), dequantised on the fly to the compute dtype.

    apply_lora(model.llm, r=16, alpha=32)                      # LoRA on attention + MLP projections
    apply_lora(model.llm, r=16, alpha=32, quantize='nf4')      # QLoRA

merge_lora folds the adapters back into plain layers; checkpoint.py's merge command does it for a run
(python checkpoint.py merge out/lora out/merged [--dequantize]). This file imports torch and bitsandbytes
(for QLoRA, when asked), nothing of glimpse.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# Attention and MLP projections of glimpse (q_proj.., qkv/proj/fc1/fc2 in the ViT), Llama/Qwen/SigLIP
# (q_proj, out_proj, gate_proj..), GPT-2 (c_attn, c_proj, c_fc), Phi (dense, fc1, fc2) and BERT-style
# towers (query, key, value, dense). Names are matched against the last part of a module's name.
DEFAULT_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'out_proj', 'gate_proj', 'up_proj', 'down_proj',
                   'qkv', 'proj', 'fc1', 'fc2', 'c_attn', 'c_proj', 'c_fc', 'dense', 'query', 'key', 'value')
# Never wrapped or quantised: the output head, embeddings and the connector (small, and they must stay exact).
NEVER = ('lm_head', 'embed', 'wte', 'wpe', 'connector')


def is_4bit(module):
    return type(module).__name__ == 'Linear4bit'


class LoRALinear(nn.Module):
    """A frozen nn.Linear, transformers Conv1D (GPT-2: weight stored (in, out)) or bitsandbytes
    Linear4bit, plus a trainable low-rank update kept in fp32."""

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.fan_in_fan_out = type(base).__name__ == 'Conv1D'
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.scale = alpha / (math.sqrt(r) if rslora else r)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, and the LoRA reference code
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):  # (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:
            return y
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # (under autocast, F.linear picks the dtype: no copy of x in fp32)
        a = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        return y + (F.linear(a, self.lora_B) * self.scale).to(y.dtype)

    def delta(self):
        """scale * B A as a (out, in) matrix, or (in, out) for Conv1D."""
        d = (self.lora_B @ self.lora_A) * self.scale
        return d.t() if self.fan_in_fan_out else d

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        if is_4bit(self.base):
            raise ValueError('cannot merge LoRA into a 4-bit base: its weights cannot hold the update; '
                             'call dequantize() first (python checkpoint.py merge ... --dequantize)')
        w = self.base.weight
        w.copy_((w.float() + self.delta()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta()).to(w.dtype))
        self.merged = False

    @torch.no_grad()
    def dequantize(self, dtype=torch.float32):
        """Replace a 4-bit base by an nn.Linear holding its dequantised weights (what the adapters
        were trained against, not the original full-precision weights)."""
        if not is_4bit(self.base):
            return
        import bitsandbytes.functional as bnbF
        q = self.base
        w = bnbF.dequantize_4bit(q.weight.data, q.weight.quant_state)  # (out, in)
        lin = nn.Linear(self.in_features, self.out_features, bias=q.bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(w.to(dtype))
        if q.bias is not None:
            lin.bias.copy_(q.bias.to(dtype))
        self.base = lin.requires_grad_(False)


def quantize_4bit(linear, quant_type='nf4', double_quant=True, compute_dtype=torch.float32):
    """A bitsandbytes Linear4bit with the weights of an nn.Linear or Conv1D, quantised on their device."""
    import bitsandbytes as bnb
    w = linear.weight.data
    if type(linear).__name__ == 'Conv1D':
        w = w.t()
    out_f, in_f = w.shape
    q = bnb.nn.Linear4bit(in_f, out_f, bias=linear.bias is not None, compute_dtype=compute_dtype,
                          compress_statistics=double_quant, quant_type=quant_type, device='meta')
    # Params4bit quantises when moved to a real device
    q.weight = bnb.nn.Params4bit(w.contiguous().to('cpu'), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=double_quant).to(w.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.float(), requires_grad=False)
    # bitsandbytes repacks 4-bit weights in place for fast CPU inference (eval mode, no grad), which fails
    # for layers narrower than a block and leaves another format for training and dequantize(): keep one
    q.support_avx512bf16_for_cpu = False
    return q


def _matches(name, targets):
    leaf = name.split('.')[-1]
    return any(re.fullmatch(t, leaf) or re.fullmatch(t, name) for t in targets)


def apply_lora(model, targets=DEFAULT_TARGETS, r=16, alpha=32, dropout=0.0, rslora=False, quantize=None,
               double_quant=True, compute_dtype=torch.float32, verbose=True):
    """Freeze model and wrap every linear layer whose name matches targets (regexes matched against
    the last part of the name, or the whole name) with LoRA; quantize='nf4' or 'fp4' makes it QLoRA.
    Parameters that were trainable elsewhere are frozen: call this on the component to adapt.
    Returns the list of wrapped module names."""
    if quantize not in (None, 'nf4', 'fp4'):
        raise ValueError(f"quantize={quantize!r}: use None (LoRA), 'nf4' or 'fp4' (QLoRA)")
    total_before = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    wrapped = []
    # by name, each layer looked up as its turn comes: a list of the modules would keep every replaced layer (a
    # QLoRA base's full-precision weights) alive until the end
    for name in [n for n, _ in model.named_modules()]:
        if not name or not _matches(name, targets) or any(n in name for n in NEVER):
            continue
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) and type(module).__name__ not in ('Conv1D', 'Linear4bit'):
            continue
        base = module
        if quantize and not is_4bit(module):
            base = quantize_4bit(module, quantize, double_quant, compute_dtype)
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(base, r, alpha, dropout, rslora))
        wrapped.append(name)
    if quantize:  # norms stay fp32 over a 4-bit base (QLoRA keeps everything but the 4-bit weights in 16/32 bit)
        for m in model.modules():
            if 'norm' in type(m).__name__.lower():
                m.float()
    if not wrapped:
        raise ValueError(f'apply_lora: no linear layer of {type(model).__name__} matches targets {list(targets)}')
    lora_params = adapter_params(model)
    if verbose:
        print(f"{'QLoRA (' + quantize + ')' if quantize else 'LoRA'} r={r}: wrapped {len(wrapped)} modules of "
              f'{type(model).__name__}; trainable {lora_params:,} of {total_before + lora_params:,} parameters '
              f'({lora_params / (total_before + lora_params):.2%})')
    return wrapped


def adapter_params(module):
    """How many LoRA adapter parameters module holds (0 without LoRA)."""
    return sum(p.numel() for n, p in module.named_parameters() if 'lora_' in n)


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model, dequantize=False):
    """Fold every adapter into its base and put the base back in its place: a plain model again.
    4-bit bases are dequantised only when asked."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            if is_4bit(module.base):
                if not dequantize:
                    raise SystemExit(f'merge error: {name} has a 4-bit base (QLoRA); merged weights need full '
                                     'precision: pass --dequantize to dequantise the base first')
                module.dequantize()
            module.merge()
            parent_name, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base)
    return model
