"""
The process a training run lives in: its device and dtype, the DDP process group under torchrun, every random
generator (seeded, saved, restored), and its metrics log (metrics.jsonl, wandb, TensorBoard). Shared by
train_vlm.py and train_siglip.py; sample.py and classify.py take the device and autocast helpers.
"""
import datetime
import functools
import json
import os
import random
import sys
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.distributed as dist

from errors import GlimpseError

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
    """'auto': bf16 on CUDA GPUs that run it natively (compute capability 8.0 on: Ampere, Hopper, ...), fp16 with
    loss scaling on older ones (V100, T4: torch.cuda.is_bf16_supported() counts their emulated bf16, which has no
    flash attention and is slow); bf16 on CPUs with native bf16; else fp32."""
    if dtype != 'auto':
        return dtype
    if device_type == 'cuda':
        native = torch.cuda.is_bf16_supported(including_emulation=False) and torch.cuda.get_device_capability()[0] >= 8
        return 'bfloat16' if native else 'float16'
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


def setup_training(device, dtype, seed, config, out_dir, timeout_minutes=120.0):
    """A training script's start: the process group under torchrun (from its RANK, LOCAL_RANK, WORLD_SIZE;
    timeout_minutes: how long a collective waits, not NCCL's default 10 minutes, which a rank-0 eval outlasts),
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
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo',
                                timeout=datetime.timedelta(minutes=timeout_minutes))
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every generator a training step can draw from (dropout, sampling): torch's on the CPU and on each CUDA
    device, numpy's and Python's, as plain Python numbers and lists: a checkpoint loads with weights_only, and
    torch.load's map_location (cuda:N on a resume) leaves them where set_rng_state can read them."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {'torch': torch.get_rng_state().tolist(), 'cuda': [s.tolist() for s in cuda],
            'numpy': [keys.tolist(), int(pos), int(has_gauss), float(cached)], 'python': random.getstate()}


def _byte_state(s):  # a generator state as rng_state() stores it (a list), or as older checkpoints did (a tensor)
    return s.cpu() if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=torch.uint8)


def set_rng_state(state):
    """Restore rng_state(); an older checkpoint's state is torch's CPU generator alone, or tensors."""
    if isinstance(state, torch.Tensor):
        return torch.set_rng_state(state.cpu())
    torch.set_rng_state(_byte_state(state['torch']))
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_byte_state(s) for s in state['cuda']])
    keys, pos, has_gauss, cached = state['numpy']
    keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.array(keys)
    np.random.set_state(('MT19937', keys.astype(np.uint32), pos, has_gauss, cached))
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

    def log(self, record):
        """record: one line of metrics.jsonl, its 'iter' the step. Its numbers go to wandb and TensorBoard too,
        a dict of them by 'key/name' ('accuracy': {'all': 0.9} as accuracy/all)."""
        if not self.active:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        scalars = {}
        for k, v in record.items():
            if isinstance(v, dict):
                scalars.update({f'{k}/{name}': x for name, x in v.items() if isinstance(x, (int, float))})
            elif isinstance(v, (int, float)) and k != 'iter':
                scalars[k] = v
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record['iter'])
        if self.wandb:
            self.wandb.log(scalars, step=record['iter'])

    def plot(self, name='training_curves.png'):
        """The run so far as a picture next to metrics.jsonl: train and val loss, and held-out accuracy per
        question type (and lmms-eval tasks' metrics, dashed), against iteration. Needs matplotlib; without it (or
        with nothing to draw) returns None and says nothing. Written to a temporary file and renamed: a half-drawn picture never replaces one."""
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
        acc = [(r['iter'], {**r.get('accuracy', {}), **{k: v for k, v in r.get('benchmarks', {}).items()
                                                         if isinstance(v, (int, float))}})
               for r in records if r.get('accuracy') or r.get('benchmarks')]
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
            ax_acc.plot(*zip(*points), label=kind, marker='o', linewidth=2.5 if kind == 'all' else 1,
                        linestyle='--' if '/' in kind else '-')  # dashed: an lmms-eval task's metric
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
