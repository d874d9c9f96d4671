"""
The connector's word pre-alignment: before the first training step, each image token is pulled toward the
pretrained LLM's input embeddings of the words that name what its part of the image holds ('red circle',
'nothing'), so that the LLM reads the image tokens as words it already knows from the first step on.

    seconds = word_align(model, tok, dataset, iters, batch_size, lr, device, amp, seed, log)

Only the connector trains: the tower runs without autograd and the LLM not at all, so a step costs one tower
forward and the connector's forward and backward (400 steps of 64 images take ~50 s on a 2-core CPU, against
~5 s for one step through SmolLM2). Token k's target is the sum of the embeddings of the tokens of cell k's
words (data.cell_words: the shapes grid, whose 3x3 cells fall one to a token with pixel_shuffle_factor=3);
the loss is the squared error over the target's mean square, so it reads the same at any embedding scale
(0 a perfect match, 1 what zeros score). A fresh AdamW of its own, warmup then cosine (optim.lr_at).
"""
import time

import numpy as np
import torch

from errors import GlimpseError
from optim import lr_at, set_lr


GRID_CELLS = 9  # prepare_data.py shapes: objects on a 3x3 grid, cells numbered in reading order


def cell_words(record, where='a record'):
    """What each grid cell of a shapes scene holds, from the record's 'objects' (cell, color, shape), in reading
    order: 'red circle', or 'nothing' for an empty cell (word_align.py's targets)."""
    objects = record.get('objects')
    if not isinstance(objects, list) or any(not {'cell', 'color', 'shape'} <= set(o) for o in objects):
        raise GlimpseError(f"data error: {where} has no 'objects' with cell, color and shape, which word_align_iters "
                           f"needs (prepare_data.py shapes writes them); train with word_align_iters=0")
    cells = {o['cell']: f"{o['color']} {o['shape']}" for o in objects}
    return [cells.get(c, 'nothing') for c in range(GRID_CELLS)]


def word_targets(tok, embeddings, dataset, indices, vectors=None):
    """(B, 9, C) float32 targets: per record, per cell, the summed embeddings of its words' tokens.
    vectors: words -> their target, filled as words come (a caller's dict keeps them across calls)."""
    vectors = {} if vectors is None else vectors
    rows = []
    for i in indices:
        r = dataset.records[i]
        words = cell_words(r, f"record {r.get('id', i)} of {dataset.data_dir}")
        for w in set(words) - vectors.keys():
            vectors[w] = embeddings[tok.encode(' ' + w)].sum(0)
        rows.append(torch.stack([vectors[w] for w in words]))
    return torch.stack(rows)


def word_align(model, tok, dataset, iters, batch_size, lr, device, amp, seed=0, log=print):
    """Train model.connector alone for iters steps toward word_targets; returns the seconds it took."""
    if model.num_image_tokens != GRID_CELLS:  # (the bridge makes none)
        raise GlimpseError(f'config error: word_align_iters needs one image token per grid cell ({GRID_CELLS}), '
                           f'the model makes {model.num_image_tokens}: use connector=\'pixel_shuffle\' with '
                           f'pixel_shuffle_factor=3 on the shapes tower, or word_align_iters=0')
    t0 = time.perf_counter()
    embeddings = model.llm.embed_tokens.weight.detach().float()
    params = list(model.connector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    vectors = {}  # words -> target, across steps
    for it in range(iters):
        set_lr(opt, lr_at(it, lr, 0.0, min(20, iters // 10), iters))
        idx = rng.integers(len(dataset), size=batch_size)
        images = torch.from_numpy(np.stack([dataset.images[dataset.records[i]['image']] for i in idx])).to(device)
        target = word_targets(tok, embeddings, dataset, idx, vectors).to(device)
        with torch.no_grad(), amp():
            features = model.vision_tower(images)
        out = model.connector(features.float()).float()
        loss = (out - target).pow(2).mean() / target.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 100 == 0 or it == iters - 1:
            cos = torch.nn.functional.cosine_similarity(out.detach(), target, dim=-1).mean().item()
            log(f'word align {it + 1}/{iters}: loss {loss.item():.4f}, cosine to the words {cos:.3f} '
                f'({time.perf_counter() - t0:.0f} s)')
    for p in params:
        p.grad = None
    return time.perf_counter() - t0
