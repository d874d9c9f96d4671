"""
Loop plumbing that train_vlm.py and train_siglip.py share: the device, dtype and process group (DDP under
torchrun), the learning-rate schedule, the optimizer and its step, one metrics log (metrics.jsonl, wandb,
TensorBoard), and the evaluation loops of a VLM (val loss, exact-match answers, caption metrics).
"""
import functools
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.distributed as dist

from data import CAPTION_PROMPT, collate
from errors import GlimpseError
from lora import adapter_params
from model import IGNORE_INDEX, VLMConfig

# -----------------------------------------------------------------------------
# device, precision, distributed

def pick_device(device):
    if device != 'auto':
        return device
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def cpu_has_fast_bf16():
    try:  # AVX512-BF16 or AMX: oneDNN runs bf16 matmuls natively
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(dtype, device_type):
    """'auto': bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with native bf16, else fp32."""
    if dtype != 'auto':
        return dtype
    if device_type == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if device_type == 'cpu' and cpu_has_fast_bf16():
        return 'bfloat16'
    return 'float32'


def precision(device_type, dtype):
    """(amp, scaler): amp() enters autocast_context for dtype; the gradient scaler does loss scaling in fp16
    only (bf16 and fp32 need none, and it is then a pass-through)."""
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
    return functools.partial(autocast_context, device_type, dtype), scaler


@contextmanager
def autocast_context(device_type, dtype):
    """Autocast to dtype ('float32' is a no-op). On CPU in bf16 it also picks SDPA's math backend:
    the CPU flash kernel's bf16 backward measured slower there. Enter a fresh one each time."""
    with ExitStack() as stack:
        if dtype != 'float32':
            stack.enter_context(torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)))
        if device_type == 'cpu' and dtype == 'bfloat16':
            from torch.nn.attention import SDPBackend, sdpa_kernel
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def setup_training(device, dtype, seed, config, out_dir):
    """A training script's start: the process group under torchrun (from its RANK, LOCAL_RANK, WORLD_SIZE),
    the device ('auto': CUDA, then MPS, then CPU), the dtype ('auto' resolved: pick_dtype, and written into
    config, which checkpoints keep), the same seed on every rank. The master prints config and makes out_dir.
    Returns (ddp, rank, local_rank, world_size, device, dtype)."""
    ddp = int(os.environ.get('RANK', -1)) != -1
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    device = pick_device(device)
    if ddp and device == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    seed_everything(seed)
    config['dtype'] = dtype = pick_dtype(dtype, device.split(':')[0])
    if rank == 0:
        print(json.dumps(config))
        os.makedirs(out_dir, exist_ok=True)
    return ddp, rank, local_rank, world, device, dtype


def finish_distributed():
    """Leave the process group together and exit at once. Skipping the interpreter's teardown is the point:
    gloo's threads, destroyed there, can abort a rank ('terminate called without an active exception') after
    everything was saved (seen in 1 of 17 tiny 2-process runs), and torchrun then reports the run failed.
    Close loggers (wandb, TensorBoard) before: their exit hooks do not run."""
    dist.barrier()
    dist.destroy_process_group()
    for f in (sys.stdout, sys.stderr):
        f.flush()
    os._exit(0)


def training_flops_per_sample(cfg: VLMConfig, n_text_tokens, num_image_tokens, vision_mode='full', llm_mode='full',
                              n_supervised=None, lora_params=(0, 0)):
    """Matmul FLOPs of one training sample, forward and backward, after the PaLM appendix: per parameter
    per token 2 forward, 2 for the gradient of its input, 2 for the gradient of its weight (plus attention
    scores). A part that is not 'full' (frozen, lora, qlora) skips its weight gradients; a frozen vision tower,
    with nothing trained before it, skips its backward altogether. lora_params (vision, llm): the adapters'
    parameter counts, each trained in full over its part's tokens. The LM head runs only where there is a
    loss (VLM.forward with targets): n_supervised tokens a sample, None = every token. Lookups cost nothing."""
    v, d = cfg.vision, cfg.llm
    patches = (v.image_size // v.patch_size) ** 2 + int(v.cls_token) + v.n_registers  # tokens in the ViT
    vit_params = v.n_layer * (4 * v.n_embd ** 2 + 2 * v.n_embd * round(v.n_embd * v.mlp_ratio))
    vit_per = {'full': 6, 'frozen': 2}.get(vision_mode, 4)
    attn = 4 * v.n_layer * v.n_embd * patches ** 2 * (1 if vision_mode == 'frozen' else 3)  # scores, values
    vit = (vit_per * vit_params + 6 * lora_params[0]) * patches + attn
    hd = d.n_embd // d.n_head
    llm_params = d.n_layer * (d.n_embd * hd * (2 * d.n_head + 2 * d.n_kv_head) + 3 * d.n_embd * d.intermediate_size)
    T = n_text_tokens + num_image_tokens
    llm_per = 6 if llm_mode == 'full' else 4
    head_tokens = T if n_supervised is None else n_supervised
    llm = ((llm_per * llm_params + 6 * lora_params[1]) * T + llm_per * d.n_embd * d.vocab_size * head_tokens
           + 12 * d.n_layer * d.n_embd * T * T / 2)  # causal attention: half the scores
    c = cfg.connector
    if c.kind == 'bridge':  # projection and keys/values per image feature; query, output and 4x MLP per text token
        C, N = c.out_dim, patches
        conn = 6 * ((c.in_dim * C + 2 * C * C) * N + 10 * C * C * T) + 12 * C * T * N
    else:
        conn_in = c.in_dim * (c.scale_factor ** 2 if c.kind.startswith('pixel_shuffle') else 1)
        second = c.out_dim ** 2 if c.kind != 'pixel_shuffle_linear' else 0  # the MLP's second layer
        conn = 6 * (conn_in * c.out_dim + second) * num_image_tokens
    return vit + conn + llm


def batch_counts(batch, image_token_id):
    """(samples, image tokens, tokens, supervised tokens) of a collated batch: what step_flops and the logs count.
    A packed batch has fewer rows than samples: one image each."""
    return (len(batch.get('images', batch['input_ids'])), int((batch['input_ids'] == image_token_id).sum()),
            int(batch['attention_mask'].sum()), int((batch['targets'] != IGNORE_INDEX).sum()))


def lora_param_counts(model):
    """(vision tower, LLM) adapter parameters, for step_flops (glimpse's VLM and an HFVLM both name the parts)."""
    parts = [getattr(model, name, None) for name in ('vision_tower', 'llm')]
    return tuple(adapter_params(p) if isinstance(p, torch.nn.Module) else 0 for p in parts)


def step_flops(model_cfg, counts, vision_mode, llm_mode, lora_params=(0, 0), head_on_supervised=True):
    """Training FLOPs of micro-batches, each counted as (samples, image tokens, tokens, supervised tokens):
    training_flops_per_sample per sample. head_on_supervised: the LM head runs only where there is a
    loss (glimpse's VLM; a whole HF VLM computes every logit)."""
    return sum(training_flops_per_sample(model_cfg, (t - i) / B, i / B, vision_mode, llm_mode,
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every generator a training step can draw from (dropout, sampling): torch's on the CPU and on each CUDA
    device, numpy's and Python's, as plain tensors and numbers (a checkpoint loads with weights_only)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            'python': random.getstate()}


def set_rng_state(state):
    """Restore rng_state(); an older checkpoint's state is torch's CPU generator alone."""
    if isinstance(state, torch.Tensor):
        return torch.set_rng_state(state.cpu())
    torch.set_rng_state(state['torch'].cpu())
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])
    keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))


def checkpoint_due(trained_seconds, minutes, master, ddp, device):
    """Whether `minutes` of training have passed since the last checkpoint (minutes 0: never), by the master's
    clock, which decides for every rank (a collective under DDP: all ranks call it together)."""
    due = torch.tensor(float(master and minutes > 0 and trained_seconds >= minutes * 60), device=device)
    if ddp:
        dist.broadcast(due, 0)
    return bool(due.item())


def rng_states_of_all_ranks(ddp, world_size):
    """[rng_state() of rank 0, 1, ...], on every rank (a collective: all ranks call it together)."""
    if not ddp:
        return [rng_state()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


# -----------------------------------------------------------------------------
# optimisation

def lr_at(it, learning_rate, min_lr, warmup_iters, max_iters):
    """Linear warmup, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def set_lr(optimizer, lr):
    """The schedule's rate for every parameter group, scaled by the group's lr_scale (see make_optimizer)."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


# learned positions, class and register tokens: glimpse's ViT's names, and those of SigLIP, CLIP and DINOv2 in transformers
NO_DECAY = ('pos_embed', 'position_embedding', 'cls_token', 'class_embedding', 'registers', 'register_tokens')


def make_optimizer(model, learning_rate, weight_decay, betas, device_type, optimizer='adamw', lr_scales=None,
                   dtype='float32'):
    """AdamW over the trainable parameters; weight decay on weight matrices only: not on norms and biases, nor on
    the learned tokens and positions of a tower (NO_DECAY: as timm and DINOv2 train them). lr_scales
    {'llm': 0.1, ...}: a component's learning rate relative to the schedule's (each group keeps its 'lr_scale').
    optimizer 'muon': Muon for the hidden weight matrices (MuonAdamW; its Newton-Schulz in bf16 on CUDA and
    in bf16 runs (dtype), else fp32);
    'adamw8bit' / 'paged_adamw': bitsandbytes, CUDA only."""
    if optimizer not in ('adamw', 'muon', 'adamw8bit', 'paged_adamw'):
        raise GlimpseError(f"config error: --optimizer={optimizer!r}: use 'adamw', 'muon', 'adamw8bit' or 'paged_adamw'")
    groups = {}
    looked_up = {id(p) for mod in model.modules() if isinstance(mod, torch.nn.Embedding) for p in mod.parameters()}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = (lr_scales or {}).get(n.split('.')[0], 1.0)
        decay = p.dim() >= 2 and not any(k in n for k in NO_DECAY)
        muon = optimizer == 'muon' and id(p) not in looked_up and is_hidden_matrix(n, p)
        g = groups.setdefault((scale, decay, muon), {'params': [], 'weight_decay': weight_decay if decay else 0.0,
                                                     'lr_scale': scale, 'lr': learning_rate * scale})
        g['params'].append(p)
    if optimizer == 'muon':
        hidden = [g for (_, _, muon), g in groups.items() if muon]
        rest = [g for (_, _, muon), g in groups.items() if not muon]
        ns_dtype = torch.bfloat16 if device_type == 'cuda' or dtype == 'bfloat16' else torch.float32
        return MuonAdamW(hidden, rest, learning_rate, betas, device_type, ns_dtype)
    groups = list(groups.values())
    if optimizer == 'adamw':
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')
    if device_type != 'cuda':
        raise GlimpseError(f"config error: --optimizer={optimizer} needs CUDA (bitsandbytes 8-bit and paged "
                         f"optimizer states); on {device_type} use --optimizer=adamw")
    import bitsandbytes as bnb
    opt = bnb.optim.AdamW8bit if optimizer == 'adamw8bit' else bnb.optim.PagedAdamW
    return opt(groups, lr=learning_rate, betas=betas)


def is_hidden_matrix(name, p):
    """A weight matrix inside the network, which Muon trains: 2-D, not an output head (make_optimizer also
    leaves out embedding tables: their rows are looked up one token at a time), not a LoRA adapter, not a
    learned position or token."""
    return p.dim() == 2 and not any(k in name for k in NO_DECAY + ('lm_head', 'lora_'))


def orthogonalize(g, steps=5, dtype=torch.bfloat16):
    """The nearest semi-orthogonal matrix to g, roughly (U S' V^T with S' in about [0.7, 1.2] for g = U S V^T):
    Newton-Schulz iterations of the quintic 3.4445 x - 4.7750 x^3 + 2.0315 x^5 (Keller Jordan's coefficients,
    tuned for speed at small singular values, not for exact convergence). dtype: bf16 where bf16 matmuls are
    native (CUDA, AVX512-BF16 CPUs); fp32 elsewhere, where bf16 is emulated and several times slower."""
    x = g.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised (Muon: Keller Jordan 2024; modded-nanogpt and nanochat train their transformers'
    matrices with it): each step is the Nesterov momentum of the gradient made near-orthogonal, so every
    direction of a weight matrix moves at a similar rate, not only the gradient's few dominant ones. For 2-D
    parameters only. The step is scaled by 0.2 sqrt(max(rows, cols)), the root-mean-square of an AdamW update
    (Moonshot's Muon scaling), so AdamW's learning rate and schedule carry over. Decoupled weight decay."""

    def __init__(self, params, lr=1e-3, momentum=0.95, weight_decay=0.0, ns_steps=5, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group['params']:
                if p.dim() != 2:
                    raise ValueError(f'Muon trains 2-D weight matrices; got a parameter of shape {tuple(p.shape)}')

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group['lr'], group['momentum']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if 'momentum' not in state:
                    state['momentum'] = torch.zeros_like(p)
                buf = state['momentum']
                buf.lerp_(p.grad, 1 - mu)  # EMA of the gradient
                direction = orthogonalize(p.grad.lerp(buf, mu), group['ns_steps'], self.ns_dtype)  # Nesterov
                p.mul_(1 - lr * group['weight_decay'])
                p.add_(direction.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class MuonAdamW:
    """Muon for the hidden weight matrices, AdamW for the rest: one optimizer to the training loop.
    param_groups lists both optimizers' groups, so set_lr reaches every one."""

    def __init__(self, hidden_groups, other_groups, lr, betas, device_type, ns_dtype=torch.float32):
        self.optimizers = [Muon(hidden_groups, lr=lr, ns_dtype=ns_dtype)]
        if other_groups:
            self.optimizers.append(torch.optim.AdamW(other_groups, lr=lr, betas=betas, fused=device_type == 'cuda'))

    @property
    def param_groups(self):  # read anew each time: load_state_dict gives each optimizer new group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'muon_adamw': [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        if 'muon_adamw' not in state or len(state['muon_adamw']) != len(self.optimizers):
            raise GlimpseError('resume error: the checkpoint\'s optimizer state is not optimizer=\'muon\'\'s; '
                               'resume with the optimizer the run was started with')
        for o, s in zip(self.optimizers, state['muon_adamw']):
            o.load_state_dict(s)


def optimizer_step(model, optimizer, scaler, grad_clip):
    """After the step's backward passes: unscale (fp16), clip the gradient norm (grad_clip > 0), step, clear."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# the metrics log

class MetricsLogger:
    """A run's measurements: one line of out_dir/metrics.jsonl per record, and its scalars to wandb and
    TensorBoard (out_dir/tensorboard) when asked, each imported only then. A logger that is not active (the
    processes other than the master) writes nothing. fresh: a new run, whose old metrics.jsonl goes."""

    def __init__(self, out_dir, active=True, fresh=True, wandb_log=False, wandb_project='', wandb_run_name='',
                 config=None, tensorboard_log=False):
        self.active, self.path, self.wandb, self.tb = active, os.path.join(out_dir, 'metrics.jsonl'), None, None
        if not active:
            return
        if fresh and os.path.exists(self.path):
            os.remove(self.path)
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, name=wandb_run_name, config=config)
            self.wandb = wandb
        if tensorboard_log:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise GlimpseError('config error: tensorboard_log=True needs the tensorboard package: '
                                   'pip install tensorboard')
            self.tb = SummaryWriter(os.path.join(out_dir, 'tensorboard'))

    def log(self, record, scalars=None):
        """record: one line of metrics.jsonl, its 'iter' the step; scalars (name -> number): to wandb and TensorBoard."""
        if not self.active:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if self.tb:
            for k, v in (scalars or {}).items():
                self.tb.add_scalar(k, v, record['iter'])
        if self.wandb and scalars:
            self.wandb.log(scalars, step=record['iter'])

    def plot(self, name='training_curves.png'):
        """The run so far as a picture next to metrics.jsonl: train and val loss, and held-out accuracy per
        question type, against iteration. Needs matplotlib; without it (or with nothing to draw) returns None
        and says nothing. Written to a temporary file and renamed: a half-drawn picture never replaces one."""
        if not self.active or not os.path.exists(self.path):
            return None
        try:
            import matplotlib
            matplotlib.use('Agg')  # files only, no display needed
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        train = [(r['iter'], r['loss']) for r in records if 'loss' in r]
        val = [(r['iter'], r['val_loss']) for r in records if 'val_loss' in r]
        acc = [(r['iter'], r['accuracy']) for r in records if r.get('accuracy')]
        if not train and not val:
            return None
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
        for points, label in ((train, 'train loss'), (val, 'val loss')):
            if points:
                ax_loss.plot(*zip(*points), label=label, marker='o' if label == 'val loss' else None)
        ax_loss.set(xlabel='iteration', ylabel='loss (per supervised token)', yscale='log')
        ax_loss.legend()
        for kind in sorted({k for _, a in acc for k in a}):
            points = [(i, a[kind]) for i, a in acc if kind in a]
            ax_acc.plot(*zip(*points), label=kind, marker='o', linewidth=2.5 if kind == 'all' else 1)
        ax_acc.set(xlabel='iteration', ylabel='held-out accuracy', ylim=(0, 1))
        if acc:
            ax_acc.legend()
        fig.tight_layout()
        path = os.path.join(os.path.dirname(self.path), name)
        fig.savefig(path + '.tmp.png', dpi=100)
        plt.close(fig)
        os.replace(path + '.tmp.png', path)
        return path

    def close(self):  # before finish_distributed, which skips the exit hooks that would flush them
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()


# -----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def val_loss(model, dataset, tokenizer, max_len, batch_size, n_batches, device, amp, isolate_turns=False):
    """Mean cross-entropy per supervised token over the first n_batches of the split."""
    total, count = 0.0, 0
    for b in range(n_batches):
        idx = list(range(b * batch_size, min(len(dataset), (b + 1) * batch_size)))
        if not idx:
            break
        batch = {k: v.to(device) for k, v in collate(dataset, idx, tokenizer, model.num_image_tokens, max_len,
                                                              isolate_turns=isolate_turns).items()}
        with amp():
            total += model(**batch).item()
        count += int((batch['targets'] != IGNORE_INDEX).sum())
    return total / max(1, count)


def normalize_answer(s):
    return ' '.join(s.lower().replace('.', ' ').replace('?', ' ').replace(',', ' ').split())


ARTICLES = ('a', 'an', 'the')


def _words(text):
    return re.findall(r'[a-z0-9]+', text.lower())


def parse_answer(text, class_names, aliases=None):
    """The class a generated answer names, or None. Case and punctuation are ignored; names match
    whole words only ('cat' is not in 'category'); the text after the last 'Answer:' is read when
    there is one, and there the first name wins; without one, the answer must name exactly one class.
    An article ('a', 'an', 'the') is a name only when it is the whole answer (multiple choice 'A')."""
    names = {' '.join(_words(c)): c for c in class_names}
    names.update({' '.join(_words(a)): c for a, c in (aliases or {}).items()})
    names.pop('', None)
    marked = [m.end() for m in re.finditer(r'answer\s*:', text, re.IGNORECASE)]
    body = ' '.join(_words(text[marked[-1]:] if marked else text))
    if body not in ARTICLES:
        body = ' '.join(w for w in body.split() if w not in ARTICLES)
    pattern = '|'.join(re.escape(n) for n in sorted(names, key=len, reverse=True))  # longest name first
    found = [names[m.group(1)] for m in re.finditer(rf'(?<![a-z0-9])({pattern})(?![a-z0-9])', body)]
    if not found:
        return None
    if marked or len(set(found)) == 1:
        return found[0]
    return None  # names two classes and says which is the answer nowhere


def answer_is_right(answer, expected, class_names):
    """Exact match (case and punctuation aside); an expected 'Reasoning: ... Answer: <class>' (classify.py
    --mode=convert --reasoning=True) is matched by the class it names, as classify.py's generate mode reads it."""
    if class_names and re.search(r'answer\s*:', expected, re.IGNORECASE):
        want = parse_answer(expected, class_names)
        if want is not None:
            return parse_answer(answer, class_names) == want
    return normalize_answer(answer) == normalize_answer(expected)


@torch.no_grad()
def qa_accuracy(model, dataset, tokenizer, device, amp, max_questions=0, batch_size=128):
    """Accuracy of greedy answers to the split's held-out questions, each asked alone with its image (see
    answer_is_right), given room for the longest expected answer. Returns {type: accuracy, ..., 'all':
    accuracy}, and the number asked."""
    items = [(r['image'], x) for r in dataset.records for x in r.get('qa', [])]
    if max_questions:
        items = items[:max_questions]
    class_names = dataset.meta.get('class_names') or []
    right, seen = defaultdict(int), defaultdict(int)
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        images = np.stack([dataset.images[i] for i, _ in chunk])
        longest = max(len(x['a'].split()) for _, x in chunk)  # words; 8 new tokens cover a one-word answer
        with amp():
            answers = model.chat(tokenizer, images, [x['q'] for _, x in chunk], max_new_tokens=max(8, 2 * longest + 4))
        for (_, x), a in zip(chunk, answers):
            ok = answer_is_right(a, x['a'], class_names)
            for key in (x['type'], 'all'):
                right[key] += ok
                seen[key] += 1
    return {k: right[k] / seen[k] for k in seen}, len(items)


@torch.no_grad()
def caption_scores(model, dataset, tokenizer, device, amp, n_images, batch_size=64, max_new_tokens=48):
    """BLEU-4 and CIDEr-D of greedy captions for the split's first n_images, against their captions."""
    records = [r for r in dataset.records if r.get('captions')][:n_images]
    candidates = []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        images = np.stack([dataset.images[r['image']] for r in chunk])
        with amp():
            candidates += model.chat(tokenizer, images, [CAPTION_PROMPT] * len(chunk), max_new_tokens=max_new_tokens)
    references = [r['captions'] for r in records]
    return {'bleu4': bleu4(candidates, references), 'cider_d': cider_d(candidates, references)}, len(records)


# -----------------------------------------------------------------------------
# caption metrics: BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015), corpus level

def caption_words(s):
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", s.lower())


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(candidates, references):
    """Corpus BLEU-4: clipped n-gram precisions pooled over the corpus, geometric mean, brevity
    penalty against the reference length closest to each candidate. references[i] is a list of strings."""
    match, total, c_len, r_len = [0] * 4, [0] * 4, 0, 0
    for cand, refs in zip(candidates, references):
        c, rs = caption_words(cand), [caption_words(r) for r in refs]
        c_len += len(c)
        r_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            max_ref = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)
            counts = _ngrams(c, n)
            match[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
            total[n - 1] += sum(counts.values())
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if c_len > r_len else math.exp(1 - r_len / max(c_len, 1))
    return bp * math.exp(log_p)


def cider_d(candidates, references, sigma=6.0):
    """Corpus CIDEr-D: per n (1..4) the cosine of TF-IDF n-gram vectors with candidate values clipped
    by the reference's, a Gaussian penalty on the length difference, times 10, averaged over the
    references, the four n and the images. Document frequencies come from the references."""
    refs_w = [[caption_words(r) for r in refs] for refs in references]
    df = Counter()
    for rs in refs_w:
        df.update({g for r in rs for n in range(1, 5) for g in _ngrams(r, n)})
    log_n = math.log(len(references))

    def tfidf(words, n):
        return {g: k * (log_n - math.log(max(1.0, df[g]))) for g, k in _ngrams(words, n).items()}

    scores = []
    for cand, rs in zip(candidates, refs_w):
        c = caption_words(cand)
        score = 0.0
        for n in range(1, 5):
            vc = tfidf(c, n)
            norm_c = math.sqrt(sum(v * v for v in vc.values()))
            for r in rs:
                vr = tfidf(r, n)
                norm_r = math.sqrt(sum(v * v for v in vr.values()))
                if norm_c == 0 or norm_r == 0:
                    continue
                dot = sum(min(vc.get(g, 0.0), v) * v for g, v in vr.items())
                score += math.exp(-(len(c) - len(r)) ** 2 / (2 * sigma ** 2)) * dot / (norm_c * norm_r)
        scores.append(10.0 * score / (4 * len(rs)))
    return sum(scores) / len(scores)
