"""
How fast a training step runs: its FLOPs, the device's peak, MFU, and which attention kernel it used.
"""
import time
from collections import Counter
from typing import NamedTuple

import torch

from lora import adapter_params
from model import IGNORE_INDEX


class BatchCounts(NamedTuple):
    """What a collated batch holds, counted on the CPU (read from the GPU, each count would wait for the kernels
    before it). A packed batch has fewer rows than samples: one image each."""
    samples: int
    image_tokens: int
    tokens: int  # real (not padding) tokens, image tokens included
    supervised: int  # tokens with a target: what the loss is normalised by


def batch_counts(batch, image_token_id):
    """BatchCounts of a collated batch: what step_flops, the loss normalisation and the logs count."""
    return BatchCounts(len(batch.get('images', batch['input_ids'])), int((batch['input_ids'] == image_token_id).sum()),
                       int(batch['attention_mask'].sum()), int((batch['targets'] != IGNORE_INDEX).sum()))


def lora_param_counts(model):
    """(vision tower, LLM) adapter parameters, for step_flops (glimpse's VLM and an HFVLM both name the parts)."""
    parts = [getattr(model, name, None) for name in ('vision_tower', 'llm')]
    return tuple(adapter_params(p) if isinstance(p, torch.nn.Module) else 0 for p in parts)


def step_flops(model_cfg, counts, vision_mode, llm_mode, lora_params=(0, 0), head_on_supervised=True):
    """Training FLOPs of micro-batches, each a BatchCounts: model.VLMConfig.training_flops_per_sample per
    sample. head_on_supervised: the LM head runs only where there is a loss (glimpse's VLM; a whole HF VLM
    computes every logit)."""
    return sum(model_cfg.training_flops_per_sample((t - i) / B, i / B, vision_mode, llm_mode,
                                                   s / B if head_on_supervised else None, lora_params) * B
               for B, i, t, s in counts)


# dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, by a part of the CUDA device
# name; the first match wins (H100 PCIe before H100). MFU on a GPU is quoted against these.
GPU_BF16_PEAKS = (('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('H800', 989e12), ('B200', 2250e12),
                  ('GH200', 989e12), ('A100', 312e12), ('A800', 312e12), ('L40S', 362e12), ('L40', 181e12),
                  ('L4', 121e12), ('A10G', 125e12), ('A10', 125e12), ('RTX 4090', 165e12), ('RTX 3090', 71e12),
                  ('V100', 125e12), ('T4', 65e12))


def measure_peak_flops(device, dtype, n=None, reps=8):
    """Achievable matmul FLOP/s on this device and dtype: the fastest of reps timed products after two
    warm-ups (other work on the machine only ever slows a product down, so the fastest is the truest)."""
    dt = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    cuda = device.startswith('cuda')
    if not cuda and dt == torch.float16:
        dt = torch.float32
    n = n or (8192 if cuda else 1536)
    g = torch.Generator(device).manual_seed(0)  # its own: the run's generators draw as if it never ran
    a, b = (torch.randn(n, n, device=device, dtype=dt, generator=g) for _ in range(2))
    best = float('inf')
    for i in range(reps + 2):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def device_peak_flops(device, dtype):
    """The FLOP/s MFU is quoted against: a known GPU's bf16 data-sheet peak, else a warm measurement."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        for part, peak in GPU_BF16_PEAKS:
            if part in name:
                return peak
    return measure_peak_flops(device, dtype)


# the ATen operators behind F.scaled_dot_product_attention, by the kernel each one stands for
SDPA_KERNELS = (('_scaled_dot_product_flash_attention_for_cpu', 'flash (CPU)'),
                ('_scaled_dot_product_fused_attention_overrideable', 'fused (device)'),
                ('_scaled_dot_product_flash_attention', 'flash'), ('_scaled_dot_product_cudnn_attention', 'cuDNN'),
                ('_scaled_dot_product_efficient_attention', 'efficient'), ('_scaled_dot_product_attention_math', 'math'),
                ('flex_attention', 'flex'))


def attention_kernels(fn):
    """Run fn() once under the profiler -> {kernel: calls} of the attention kernels it ran (forward only:
    the backward ops carry _backward names and are not counted)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    used = Counter()
    for e in prof.key_averages():
        if e.key.endswith('_backward'):
            continue
        for op, kernel in SDPA_KERNELS:
            if e.key.removeprefix('aten::') == op or (op == 'flex_attention' and op in e.key):
                used[kernel] += e.count
                break
    return dict(used)


def mfu_text(flops_per_s, peak):
    """'MFU 41.2%'; a share outside [0, 1] means the peak is wrong (measured low, or a wrong peak_flops),
    and is not shown as a figure."""
    share = flops_per_s / peak
    if 0 <= share <= 1:
        return f'MFU {share:.1%}'
    return f'MFU n/a ({flops_per_s / 1e9:.0f} GFLOP/s is above the peak of {peak / 1e9:.0f}: set peak_flops)'


class Throughput:
    """The training steps since the last report, as rates: text and image tokens/s, images/s and MFU. add() each
    step's BatchCounts (this process's; world_size scales them to the whole run), report(seconds) the rates of
    what was added since the last report, and starts counting anew. peak: the FLOP/s MFU is quoted against
    (0: device_peak_flops, measured again by remeasure_peak, which keeps the best figure)."""

    def __init__(self, model_cfg, vision_mode, llm_mode, lora_params, head_on_supervised, device, dtype,
                 world_size=1, peak=0.0):
        self.flops_args = (model_cfg, vision_mode, llm_mode, lora_params, head_on_supervised)
        self.device, self.dtype, self.world_size, self.fixed_peak = device, dtype, world_size, bool(peak)
        self.peak = peak or device_peak_flops(device, dtype)
        self.reset()

    def reset(self):
        self.text_tokens = self.image_tokens = self.images = 0
        self.flops = 0.0

    def add(self, counts):
        for c in counts:
            self.text_tokens += c.tokens - c.image_tokens
            self.image_tokens += c.image_tokens
            self.images += c.samples
        self.flops += step_flops(self.flops_args[0], counts, *self.flops_args[1:])

    def remeasure_peak(self):
        """A start-up measurement taken beside other work reads low: measure again (at an eval) and keep the best."""
        if not self.fixed_peak:
            self.peak = max(self.peak, device_peak_flops(self.device, self.dtype))

    def report(self, seconds):
        """{'text_tok_s', 'image_tok_s', 'img_s', 'mfu'} over the whole run (every process), and a line of them."""
        w = self.world_size / seconds
        rates = {'text_tok_s': self.text_tokens * w, 'image_tok_s': self.image_tokens * w, 'img_s': self.images * w,
                 'mfu': self.flops / seconds / self.peak}
        line = (f"{rates['text_tok_s']:.0f} text tok/s, {rates['image_tok_s']:.0f} image tok/s, "
                f"{rates['img_s']:.1f} img/s, " + mfu_text(self.flops / seconds, self.peak))
        self.reset()
        return rates, line
