"""
Plumbing shared by the training scripts (and read by sample.py): device and distributed setup,
the dataset reader and batching, the data order, the learning-rate schedule, the optimizer,
checkpoints, and evaluation.
"""
import json
import math
import os
import random
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.distributed as dist

from model import IGNORE_INDEX, ConnectorConfig, DecoderConfig, Tokenizer, ViTConfig, VLMConfig


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


def setup_distributed(device):
    """From torchrun's RANK, LOCAL_RANK, WORLD_SIZE. Returns (ddp, rank, local_rank, world_size, device)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 0, 1, pick_device(device)
    rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    device = pick_device(device)
    if device == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return True, rank, local_rank, world, device


def measure_peak_flops(device, dtype, n=2048, reps=5):
    """Achievable matmul FLOP/s on this device and dtype, for MFU when no peak is given."""
    dt = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    if device.startswith('cpu') and dt == torch.float16:
        dt = torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    times = []
    for i in range(reps + 1):
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / sorted(times[1:])[reps // 2]


# -----------------------------------------------------------------------------
# data: the on-disk format of prepare_data.py

class VLMDataset:
    """One split of a prepared dataset: records from <split>.jsonl, pixels memory-mapped from images.npy."""

    def __init__(self, data_dir, split, max_samples=0):
        for name in ('meta.json', 'images.npy', f'{split}.jsonl'):
            if not os.path.exists(os.path.join(data_dir, name)):
                raise SystemExit(f"data error: {os.path.join(data_dir, name)} not found; "
                                 f"make it with: python prepare_data.py shapes --out_dir={data_dir}")
        with open(os.path.join(data_dir, 'meta.json')) as f:
            self.meta = json.load(f)
        self.images = np.load(os.path.join(data_dir, 'images.npy'), mmap_mode='r')
        self.records = []
        path = os.path.join(data_dir, f'{split}.jsonl')
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if max_samples and len(self.records) >= max_samples:
                    break
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f'data error: {path} line {lineno} is not valid JSON ({e.msg})')

    def __len__(self):
        return len(self.records)

    def texts(self):
        for r in self.records:
            for t in r.get('turns', []):
                yield t['content']
            yield from r.get('captions', [])


def conversation(record, caption_prompt='describe the image.'):
    """The turns to train on: the record's own, or a caption as the answer to a fixed prompt."""
    if record.get('turns'):
        return record['turns']
    return [{'role': 'user', 'content': '<image>\n' + caption_prompt},
            {'role': 'assistant', 'content': record['captions'][0]}]


def pack_turns(tokenizer, turns, num_image_tokens, isolate_turns=False):
    """Token ids, supervised flags, positions and segment ids of a conversation.
    isolate_turns=False: one causal conversation; every token is in segment 0.
    isolate_turns=True: each (user, assistant) pair becomes its own single-turn conversation about
    the image. They share one prefix, which ends with the image tokens (segment 0, computed once);
    pair k is segment k, sees only the prefix and itself, and has the positions it would have alone.
    So an answer can only come from the image, never from an earlier answer, exactly as at test time."""
    if not isolate_turns:
        ids, sup = tokenizer.encode_chat(turns, num_image_tokens)
        return ids, sup, list(range(len(ids))), [0] * len(ids)
    ids = sup = pos = seg = None
    for k in range(0, len(turns) - 1, 2):
        q = turns[k]['content'] if k == 0 else '<image>\n' + turns[k]['content']
        one, one_sup = tokenizer.encode_chat([{'role': 'user', 'content': q}, turns[k + 1]], num_image_tokens)
        p = max(i for i, t in enumerate(one) if t == tokenizer.image_token_id) + 1
        if ids is None:
            ids, sup, pos, seg = one[:p], one_sup[:p], list(range(p)), [0] * p
        ids, sup = ids + one[p:], sup + one_sup[p:]
        pos, seg = pos + list(range(p, len(one))), seg + [k // 2 + 1] * (len(one) - p)
    return ids, sup, pos, seg


def encode_sample(tokenizer, turns, num_image_tokens, max_len, isolate_turns=False):
    """(ids, targets, positions, segment_ids, turns dropped) for one conversation, or None if not even
    the first answer fits. Too long: whole trailing turns are dropped, never part of the image or of
    an answer. targets[t] is the next token where that token is supervised, else IGNORE_INDEX."""
    dropped = 0
    while True:
        ids, sup, pos, seg = pack_turns(tokenizer, turns, num_image_tokens, isolate_turns)
        if len(ids) <= max_len or len(turns) <= 2:
            break
        turns, dropped = turns[:-2], dropped + 2
    if len(ids) > max_len or not any(sup):
        return None
    targets = [t if s and sg == sg_prev else IGNORE_INDEX
               for t, s, sg, sg_prev in zip(ids[1:], sup[1:], seg[1:], seg[:-1])] + [IGNORE_INDEX]
    return ids, targets, pos, seg, dropped


def collate(dataset, indices, tokenizer, num_image_tokens, max_len, stats=None, isolate_turns=False):
    """Right-padded batch: input_ids, targets (IGNORE_INDEX at padding), attention_mask, images,
    and positions and segment_ids when turns are isolated."""
    seqs, rows = [], []
    for i in indices:
        r = dataset.records[i]
        enc = encode_sample(tokenizer, conversation(r), num_image_tokens, max_len, isolate_turns)
        if enc is None:
            if stats is not None:
                stats['skipped_too_long'] += 1
            continue
        if stats is not None and enc[4]:
            stats['truncated'] += 1
        seqs.append(enc)
        rows.append(r['image'])
    if not seqs:
        raise SystemExit(f'data error: no sample of this batch fits in max_seq_len={max_len}; raise it')
    T = max(len(s[0]) for s in seqs)
    batch = dict(input_ids=torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long),
                 targets=torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long),
                 attention_mask=torch.zeros((len(seqs), T), dtype=torch.bool),
                 positions=torch.zeros((len(seqs), T), dtype=torch.long),
                 segment_ids=torch.zeros((len(seqs), T), dtype=torch.long))
    for b, (ids, tg, pos, seg, _) in enumerate(seqs):
        n = len(ids)
        batch['input_ids'][b, :n], batch['targets'][b, :n] = torch.tensor(ids), torch.tensor(tg)
        batch['positions'][b, :n], batch['segment_ids'][b, :n] = torch.tensor(pos), torch.tensor(seg)
        batch['attention_mask'][b, :n] = True
    if not isolate_turns:
        del batch['positions'], batch['segment_ids']
    batch['images'] = torch.from_numpy(np.stack([dataset.images[j] for j in rows]))
    return batch


class DataOrder:
    """A seeded permutation per epoch; state is (epoch, cursor), so a resumed run sees the same order."""

    def __init__(self, n, seed, epoch=0, cursor=0):
        self.n, self.seed, self.epoch, self.cursor = n, seed, epoch, cursor
        self._perm = self._permutation()

    def _permutation(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k):
        out = []
        while len(out) < k:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation()
            step = min(k - len(out), self.n - self.cursor)
            out += self._perm[self.cursor:self.cursor + step]
            self.cursor += step
        return out

    def state(self):
        return {'epoch': self.epoch, 'cursor': self.cursor}


def vlm_config(c, tok):
    """The model of a training config (train_vlm.py's keys), for this tokenizer."""
    return VLMConfig(
        vision=ViTConfig(image_size=c['image_size'], patch_size=c['patch_size'], patch_overlap=c['patch_overlap'],
                         n_layer=c['vit_layers'], n_head=c['vit_heads'], n_embd=c['vit_width']),
        connector=ConnectorConfig(kind=c['connector'], in_dim=c['vit_width'], out_dim=c['llm_width'],
                                  scale_factor=c['pixel_shuffle_factor']),
        llm=DecoderConfig(vocab_size=tok.vocab_size, n_layer=c['llm_layers'], n_head=c['llm_heads'],
                          n_kv_head=c['llm_kv_heads'], n_embd=c['llm_width'], intermediate_size=c['llm_mlp_width'],
                          tie_embeddings=c['tie_embeddings']),
        image_token_id=tok.image_token_id)


# -----------------------------------------------------------------------------
# optimisation

def lr_at(it, learning_rate, min_lr, warmup_iters, max_iters):
    """Linear warmup, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def make_optimizer(model, learning_rate, weight_decay, betas, device_type):
    """AdamW; weight decay on matrices only (not on norms, biases or learned positions)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and 'pos_embed' not in n]
    decay_ids = {id(p) for p in decay}
    no_decay = [p for p in params if id(p) not in decay_ids]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(obj, path):
    """Written to a temporary file and renamed: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device='cpu'):
    if not os.path.exists(path):
        raise SystemExit(f'checkpoint error: {path} not found; train one with: python train_vlm.py config/shapes.py')
    return torch.load(path, map_location=device, weights_only=True)


def siglip_vision_tower(out_dir):
    """(ViTConfig, weights) of the image tower of a train_siglip.py run, for train_vlm.py's vision=<out_dir>."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise SystemExit(f"vision error: {path} not found; vision= takes 'scratch' or the out_dir of a "
                         f"train_siglip.py run")
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    cfg = ckpt.get('model_config', {})
    if 'image_tower' not in cfg:
        raise SystemExit(f'vision error: {path} was not written by train_siglip.py (no image_tower in its model_config)')
    if cfg['image_tower'] != 'vit':
        raise SystemExit(f"vision error: {path} holds a {cfg['image_tower']} image tower; the VLM takes a ViT one "
                         f"(train_siglip.py --image_tower=vit)")
    weights = {k[len('vision_tower.'):]: v for k, v in ckpt['model'].items() if k.startswith('vision_tower.')}
    return ViTConfig(**cfg['vision']), weights


def raw_state_dict(model):
    """The weights without the '_orig_mod.' (torch.compile) or 'module.' (DDP) prefixes."""
    model = getattr(model, 'module', model)
    model = getattr(model, '_orig_mod', model)
    return model.state_dict()


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


@torch.no_grad()
def qa_accuracy(model, dataset, tokenizer, device, amp, max_questions=0, batch_size=128):
    """Exact-match accuracy of greedy answers to the split's held-out questions, each asked alone
    with its image. Returns {type: accuracy, ..., 'all': accuracy}, and the number asked."""
    items = [(r['image'], x) for r in dataset.records for x in r.get('qa', [])]
    if max_questions:
        items = items[:max_questions]
    right, seen = defaultdict(int), defaultdict(int)
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        images = np.stack([dataset.images[i] for i, _ in chunk])
        with amp():
            answers = model.chat(tokenizer, images, [x['q'] for _, x in chunk], max_new_tokens=8)
        for (_, x), a in zip(chunk, answers):
            ok = normalize_answer(a) == normalize_answer(x['a'])
            for key in (x['type'], 'all'):
                right[key] += ok
                seen[key] += 1
    return {k: right[k] / seen[k] for k in seen}, len(items)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
