"""
Speed and memory of one training step of a train_vlm.py config, on real batches of its dataset, with the
model train_vlm.py would train: the same keys and defaults, built by the same checkpoint.build_model
(pretrained LLM or tower, a whole Hugging Face VLM, frozen parts, LoRA and QLoRA).

    python bench.py config/shapes.py
    python bench.py config/shapes.py --dtype=float32 --batch_size=64 --compile=True
    python bench.py config/shapes_smollm2.py
    python bench.py config/llava_align.py --plan    # the memory plan: will it fit, on 1, 4 or 8 GPUs of 24/40/80 GB?

Warm-up steps, then the median of bench_iters timed steps. Prints text tokens/s, samples/s,
MFU (FLOPs counted from the model config against peak_flops, a known GPU's bf16 peak, or a warm matmul
peak measured here), peak memory (CUDA allocator, or the process's peak RSS on CPU) and the attention kernels
the step ran (flash, cuDNN, efficient, math: read from the profiler, forward calls per step).

--plan times nothing and needs neither data nor weights: per-GPU bytes of weights, gradients, optimizer state and
activations under DDP and FSDP (fsdp=True) on 1, 4 and 8 GPUs, which of 24, 40 and 80 GB cards each fits, and the
largest batch that fits (memory_plan.py).
"""
import functools
import resource
import statistics
import sys
import time

import torch

from checkpoint import ModelSpec, build_model
from configurator import apply_config, script_defaults
from data import DataOrder, VLMDataset, collate
from optim import make_optimizer, optimizer_step
from perf import attention_kernels, batch_counts, device_peak_flops, lora_param_counts, mfu_text, step_flops
from runtime import autocast_context, pick_device, pick_dtype, seed_everything

globals().update(script_defaults('train_vlm.py'))  # the same keys and defaults as training
bench_iters = 20
bench_warmup = 5
plan = False  # print the memory plan (memory_plan.py) instead of timing a step
config = apply_config(sys.argv[1:], globals())
# -----------------------------------------------------------------------------

if plan:
    import memory_plan
    name = ' '.join(a for a in sys.argv[1:] if not a.startswith('--')) or "train_vlm.py's defaults"
    print(memory_plan.table(name, memory_plan.plan(config), config))
    sys.exit()

if init_from == 'resume':
    raise SystemExit("config error: bench.py times a run's model from its start; give init_from 'scratch' or an "
                     "earlier run's out_dir")
seed_everything(seed)
device = pick_device(device)
device_type = device.split(':')[0]
dtype = config['dtype'] = pick_dtype(dtype, device_type)
amp = functools.partial(autocast_context, device_type, dtype)
train_set = VLMDataset(data_dir, 'train', max_samples)
spec = ModelSpec.from_config(config)
spec.check(device_type, dict(config, fsdp=False))  # one process, unsharded: --plan says what fsdp saves
model, tok, model_cfg, _ = build_model(spec, device, train_set.texts(), trust_remote_code=trust_remote_code)
n_img = model.num_image_tokens
lr_scales = {part: lr / learning_rate for part, lr in
             (('vision_tower', vision_lr), ('connector', connector_lr), ('llm', llm_lr)) if lr}
optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device_type, optimizer, lr_scales,
                           dtype)
scaler = torch.amp.GradScaler(enabled=dtype == 'float16')
step_model = torch.compile(model) if compile else model
order = DataOrder(len(train_set), seed)
batches = [collate(train_set, order.take(batch_size), tok, n_img, max_seq_len, isolate_turns=isolate_turns,
                   pack=pack_samples, pad_to_max=attention == 'flex') for _ in range(grad_accum)]
# per batch, counted as train_vlm.py counts them (perf.BatchCounts)
counts = [batch_counts(b, model_cfg.image_token_id) for b in batches]
padding = 1 - sum(c.tokens for c in counts) / sum(b['input_ids'].numel() for b in batches)  # share of the rows
batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
n_samples, n_image = sum(c.samples for c in counts), sum(c.image_tokens for c in counts)
n_text = sum(c.tokens for c in counts) - n_image
lora_params = lora_param_counts(model)
flops = step_flops(model_cfg, counts, vision_mode, llm_mode, lora_params, head_on_supervised=not hf_vlm)
n_sup = sum(c.supervised for c in counts)
peak = peak_flops or device_peak_flops(device, dtype)


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()


def step():
    for b in batches:
        with amp():
            loss = step_model(**b) / n_sup
        scaler.scale(loss).backward()
    optimizer_step(model, optimizer, scaler, grad_clip)


times = []
for i in range(bench_warmup + bench_iters):
    sync()
    t = time.perf_counter()
    step()
    sync()
    if i >= bench_warmup:
        times.append(time.perf_counter() - t)
kernels = attention_kernels(step)  # one more step, profiled (after the timed ones: the profiler slows it)

dt = statistics.median(times)
if device_type == 'cuda':
    memory = f'{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB peak allocated (CUDA)'
else:
    memory = f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB peak RSS (process)'
counts = model.param_counts()
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
rows = sum(len(b['input_ids']) for b in batches)
print(f'{device} {dtype}, batch {batch_size} x {grad_accum}, {counts["total"]:,} parameters ({trainable:,} trained; '
      f'vision {vision_mode}, llm {llm_mode}), {n_image / n_samples:.0f} image tokens + '
      f'{n_text / n_samples:.0f} text tokens per sample, {rows} rows{" packed" if pack_samples else ""}, '
      f'{padding:.1%} padding')
print(f'step {dt * 1000:.1f} ms (median of {bench_iters}, min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}) | '
      f'{n_text / dt:.0f} text tok/s | {(n_text + n_image) / dt:.0f} tok/s with image tokens | '
      f'{n_samples / dt:.1f} samples/s | {flops / dt / 1e9:.1f} GFLOP/s, {mfu_text(flops / dt, peak)} '
      f'of {peak / 1e9:.0f} GFLOP/s | {memory}')
print('attention kernels (forward calls a step): ' + (', '.join(f'{k} x{n}' for k, n in kernels.items()) or 'none'))
