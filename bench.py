"""
Speed and memory of one training step of a train_vlm.py config, on real batches of its dataset.

    python bench.py config/shapes.py
    python bench.py config/shapes.py --dtype=float32 --batch_size=64 --compile=True

Warm-up steps, then the median of bench_iters timed steps. Prints text tokens/s, samples/s,
MFU (FLOPs counted from the model config against peak_flops, or a measured matmul peak) and
peak memory (CUDA allocator, or the process's peak RSS on CPU).
"""
import functools
import resource
import statistics
import sys
import time

import torch

from configurator import apply_config, script_defaults
from model import VLM, IGNORE_INDEX, Tokenizer, training_flops_per_sample
from training import (DataOrder, VLMDataset, autocast_context, collate, make_optimizer, measure_peak_flops,
                      pick_device, pick_dtype, pretrained_vision, vlm_config)

globals().update(script_defaults('train_vlm.py'))  # the same keys and defaults as training
bench_iters = 20
bench_warmup = 5
config = apply_config(sys.argv[1:], globals())
# -----------------------------------------------------------------------------

torch.manual_seed(seed)
device = pick_device(device)
device_type = device.split(':')[0]
dtype = pick_dtype(dtype, device_type)
amp = functools.partial(autocast_context, device_type, dtype)
train_set = VLMDataset(data_dir, 'train', max_samples)
tok = Tokenizer.build(tokenizer, train_set.texts())
model_cfg = vlm_config(config, tok)
vision_weights = pretrained_vision(config, model_cfg)
model = VLM(model_cfg).to(device)
if vision_weights:
    model.vision_tower.load_state_dict(vision_weights)
model.vision_tower.requires_grad_(vision_mode == 'full')
n_img = model.num_image_tokens
optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device_type)
step_model = torch.compile(model) if compile else model
order = DataOrder(len(train_set), seed)
batches = [collate(train_set, order.take(batch_size), tok, n_img, max_seq_len, isolate_turns=isolate_turns)
           for _ in range(grad_accum)]
batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
n_text = sum(int(b['attention_mask'].sum()) - n_img * len(b['images']) for b in batches)
n_samples = sum(len(b['images']) for b in batches)
flops = sum(training_flops_per_sample(model_cfg, (int(b['attention_mask'].sum()) / len(b['images'])) - n_img, n_img,
                                      vision_mode == 'full', llm_mode == 'full') * len(b['images']) for b in batches)
peak = peak_flops or measure_peak_flops(device, dtype)


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()


times = []
for i in range(bench_warmup + bench_iters):
    sync()
    t = time.perf_counter()
    n_sup = sum(int((b['targets'] != IGNORE_INDEX).sum()) for b in batches)
    for b in batches:
        with amp():
            loss = step_model(**b) / n_sup
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    if i >= bench_warmup:
        times.append(time.perf_counter() - t)

dt = statistics.median(times)
if device_type == 'cuda':
    memory = f'{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB peak allocated (CUDA)'
else:
    memory = f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB peak RSS (process)'
print(f'{device} {dtype}, batch {batch_size} x {grad_accum}, {model.param_counts()["total"] / 1e6:.2f}M params, '
      f'{n_img} image tokens + {n_text / n_samples:.0f} text tokens per sample')
print(f'step {dt * 1000:.1f} ms (median of {bench_iters}, min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}) | '
      f'{n_text / dt:.0f} text tok/s | {(n_text + n_img * n_samples) / dt:.0f} tok/s with image tokens | '
      f'{n_samples / dt:.1f} samples/s | {flops / dt / 1e9:.1f} GFLOP/s, MFU {flops / dt / peak:.1%} '
      f'of {peak / 1e9:.0f} GFLOP/s | {memory}')
