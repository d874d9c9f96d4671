"""
Train a VLM: vision tower + connector + causal LLM, on a dataset made by prepare_data.py.

    python train_vlm.py config/shapes.py
    python train_vlm.py config/shapes.py --batch_size=16 --max_iters=200 --compile=False
    torchrun --standalone --nproc_per_node=2 train_vlm.py config/shapes.py

Defaults below; a config file and --key=value overrides replace them (see configurator.py).
"""
import functools
import json
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import apply_config
from model import VLM, IGNORE_INDEX, Tokenizer, VLMConfig, training_flops_per_sample
from training import (DataOrder, VLMDataset, autocast_context, collate, load_checkpoint, lr_at, make_optimizer,
                      measure_peak_flops, pick_dtype, qa_accuracy, raw_state_dict, save_checkpoint,
                      setup_distributed, siglip_vision_tower, seed_everything, val_loss, vlm_config)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/shapes'
data_dir = 'data/shapes'
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
max_samples = 0  # train on the first N samples only (0 = all), for quick runs
# model
vision = 'scratch'  # 'scratch' (a ViT from the vit_* keys) or a train_siglip.py out_dir (its ViT and weights)
vision_mode = 'full'  # 'full' trains the vision tower, 'frozen' keeps its weights
image_size = 64
patch_size = 8
patch_overlap = 0  # each patch embedding also sees this many pixels of its neighbours
vit_layers = 4
vit_width = 128
vit_heads = 4
connector = 'pixel_shuffle'  # 'mlp' or 'pixel_shuffle'
pixel_shuffle_factor = 2
llm_layers = 4
llm_width = 256
llm_heads = 4
llm_kv_heads = 2
llm_mlp_width = 688
tie_embeddings = True
tokenizer = 'word'  # 'word' (vocabulary from the training texts) or 'byte'
max_seq_len = 256
isolate_turns = False  # each question-answer pair sees the image but not the other pairs (see training.pack_turns)
# optimisation
batch_size = 32  # per process, per micro-step
grad_accum = 1  # micro-steps per optimizer step
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation and logging
eval_interval = 250
eval_questions = 500  # held-out val questions answered by generation at each eval
val_batches = 8
test_at_end = True  # answer every test-split question when training ends
log_interval = 10
peak_flops = 0.0  # device peak FLOP/s for MFU; 0 = measure a large matmul at start
wandb_log = False
wandb_project = 'glimpse'
wandb_run_name = 'shapes'
# system
device = 'auto'  # 'auto' picks cuda, then mps, then cpu
dtype = 'auto'  # 'auto', 'float32', 'bfloat16' or 'float16'
compile = False
seed = 1337
config = apply_config(sys.argv[1:], globals())
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device = setup_distributed(device)
master = rank == 0
device_type = device.split(':')[0]
dtype = config['dtype'] = pick_dtype(dtype, device_type)
seed_everything(seed)  # the same initial weights on every rank
amp = functools.partial(autocast_context, device_type, dtype)
scaler = torch.amp.GradScaler(enabled=dtype == 'float16')
if master:
    print(json.dumps(config))
    os.makedirs(out_dir, exist_ok=True)

# data
train_set = VLMDataset(data_dir, 'train', max_samples)
val_set = VLMDataset(data_dir, 'val')
ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'), device) if init_from == 'resume' else None
tok = Tokenizer.from_state(ckpt['tokenizer']) if ckpt else Tokenizer.build(tokenizer, train_set.texts())

# model
if ckpt:
    model_cfg = VLMConfig.from_dict(ckpt['model_config'])
else:
    model_cfg = vlm_config(config, tok)
    if vision != 'scratch':  # the stage-1 tower replaces the vit_* keys
        model_cfg.vision, vision_weights = siglip_vision_tower(vision)
        model_cfg.connector.in_dim = model_cfg.vision.n_embd
model = VLM(model_cfg).to(device)
if ckpt:
    model.load_state_dict(ckpt['model'])
elif vision != 'scratch':
    model.vision_tower.load_state_dict(vision_weights)
if vision_mode not in ('full', 'frozen'):
    raise SystemExit(f"config error: vision_mode='{vision_mode}'; use 'full' or 'frozen'")
model.vision_tower.requires_grad_(vision_mode == 'full')
raw_model = model
n_img = model.num_image_tokens
if master:
    print(f'parameters: {model.param_counts()}; {n_img} image tokens; vocab {tok.vocab_size}; '
          f'train {len(train_set)}, val {len(val_set)}; device {device}, dtype {dtype}, world {world_size}')

optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device_type)
order = DataOrder(len(train_set), seed)
iter_num, best_val, train_time = 0, float('inf'), 0.0  # train_time: seconds in training steps, not evaluation
if ckpt:
    optimizer.load_state_dict(ckpt['optimizer'])
    iter_num, best_val = ckpt['iter_num'], ckpt['best_val_loss']
    order = DataOrder(len(train_set), seed, **ckpt['data_order'])
    train_time = ckpt['train_time']
    torch.set_rng_state(ckpt['rng'].cpu())
    ckpt = None
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)

if wandb_log and master:
    import wandb
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
peak = peak_flops or measure_peak_flops(device, dtype)


def evaluate():
    raw_model.eval()
    loss = val_loss(raw_model, val_set, tok, max_seq_len, batch_size, val_batches, device, amp, isolate_turns)
    acc, n = qa_accuracy(raw_model, val_set, tok, device, amp, eval_questions)
    raw_model.train()
    return loss, acc, n


def save(path):
    save_checkpoint({'model': raw_state_dict(model), 'optimizer': optimizer.state_dict(),
                     'model_config': model_cfg.to_dict(), 'tokenizer': tok.state(), 'config': config,
                     'iter_num': iter_num, 'best_val_loss': best_val, 'data_order': order.state(),
                     'train_time': train_time, 'rng': torch.get_rng_state()}, path)


# -----------------------------------------------------------------------------
stats = Counter()
metrics_path = os.path.join(out_dir, 'metrics.jsonl')
if master and iter_num == 0 and os.path.exists(metrics_path):
    os.remove(metrics_path)
dt_window = 0.0
tokens_text = tokens_img = images_seen = 0
flops_done = 0.0
while True:
    lr = lr_at(iter_num, learning_rate, min_lr, warmup_iters, max_iters)
    for group in optimizer.param_groups:
        group['lr'] = lr

    if master and (iter_num % eval_interval == 0 or iter_num == max_iters):
        loss, acc, n = evaluate()
        print(f'eval iter {iter_num}: val loss {loss:.4f}, accuracy on {n} val questions ' +
              ', '.join(f'{k} {v:.1%}' for k, v in sorted(acc.items())) + f' ({train_time / 60:.1f} min trained)')
        with open(metrics_path, 'a') as f:
            f.write(json.dumps({'iter': iter_num, 'train_minutes': train_time / 60, 'val_loss': loss,
                                'accuracy': acc}) + '\n')
        if wandb_log:
            wandb.log({'iter': iter_num, 'val/loss': loss, **{f'val/acc_{k}': v for k, v in acc.items()}})
        best_val = min(best_val, loss)
        if iter_num > 0:
            save(os.path.join(out_dir, 'ckpt.pt'))
            print(f'saved {out_dir}/ckpt.pt')
    if iter_num >= max_iters:
        break
    t_step = time.perf_counter()  # evaluation and logging do not count as training time

    # one optimizer step: grad_accum micro-batches on each of world_size processes
    idx = order.take(batch_size * grad_accum * world_size)
    micro = []
    for k in range(grad_accum):
        chunk = idx[(k * world_size + rank) * batch_size:(k * world_size + rank + 1) * batch_size]
        micro.append({key: v.to(device) for key, v in
                      collate(train_set, chunk, tok, n_img, max_seq_len, stats, isolate_turns).items()})
    # normalise by the supervised tokens of the whole step, over micro-steps and processes
    n_sup = torch.tensor(float(sum(int((b['targets'] != IGNORE_INDEX).sum()) for b in micro)), device=device)
    if ddp:
        torch.distributed.all_reduce(n_sup)
    loss_acc = torch.zeros((), device=device)
    for k, batch in enumerate(micro):
        sync = not ddp or k == grad_accum - 1
        with (nullcontext() if sync else model.no_sync()):
            with amp():
                loss_sum = model(**batch)
            # DDP averages gradients over processes; multiplying by world_size turns that into a sum
            scaler.scale(loss_sum * world_size / n_sup).backward()
        loss_acc += loss_sum.detach()
        n_text = int(batch['attention_mask'].sum()) - n_img * len(batch['images'])
        tokens_text += n_text
        tokens_img += n_img * len(batch['images'])
        images_seen += len(batch['images'])
        flops_done += training_flops_per_sample(model_cfg, n_text / len(batch['images']), n_img) * len(batch['images'])
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    dt_window += time.perf_counter() - t_step

    if iter_num % log_interval == 0:
        if ddp:
            torch.distributed.all_reduce(loss_acc)
        step_loss = loss_acc.item() / n_sup.item()  # mean over the step's supervised tokens, all processes
    if iter_num % log_interval == 0 and master:
        dt, train_time, dt_window = dt_window, train_time + dt_window, 0.0
        with open(metrics_path, 'a') as f:
            f.write(json.dumps({'iter': iter_num, 'loss': step_loss, 'lr': lr}) + '\n')
        print(f'iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, {tokens_text * world_size / dt:.0f} text tok/s, '
              f'{tokens_img * world_size / dt:.0f} image tok/s, {images_seen * world_size / dt:.1f} img/s, '
              f'MFU {flops_done / dt / peak:.1%}' + (f', {dict(stats)}' if stats else ''))
        if wandb_log:
            wandb.log({'iter': iter_num, 'train/loss': step_loss, 'lr': lr})
        tokens_text = tokens_img = images_seen = 0
        flops_done = 0.0

if master:
    print(f'{iter_num} iterations, {train_time / 60:.1f} min of training')
    if test_at_end:
        test_set = VLMDataset(data_dir, 'test')
        raw_model.eval()
        acc, n = qa_accuracy(raw_model, test_set, tok, device, amp)
        print(f'held-out test accuracy on {n} questions: ' + ', '.join(f'{k} {v:.1%}' for k, v in sorted(acc.items())))
        with open(os.path.join(out_dir, 'test_accuracy.json'), 'w') as f:
            json.dump({'questions': n, 'accuracy': acc, 'iter': iter_num, 'train_minutes': train_time / 60}, f)
if ddp:
    torch.distributed.barrier()  # rank 0 may still be testing: leave together
    torch.distributed.destroy_process_group()
