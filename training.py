"""
Plumbing shared by the training scripts (and read by sample.py): device and distributed setup,
the dataset reader and batching, the data order, the learning-rate schedule, the optimizer,
checkpoints, and evaluation.
"""
import io
import itertools
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist

from lora import apply_lora, base_fingerprint, check_fingerprint, load_trained_state_dict, merge_lora
from model import (IGNORE_INDEX, VLM, ConnectorConfig, DecoderConfig, HFCausalLM, HFProcessor, HFVLM, Tokenizer,
                   ViTConfig, VLMConfig, blocks_kept, checkpoint_context, load_pretrained_llm, load_pretrained_vision)


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

class ShardImages:
    """Rows of a --shards dataset: shards/index.npy is int64 (N, 3) = (shard, offset, length) of each
    encoded image in shards/shard-*.bin. Indexing reads and decodes one image -> uint8 (H, W, 3);
    os.pread keeps it safe in forked DataLoader workers (no shared file position)."""

    def __init__(self, data_dir):
        self.dir = os.path.join(data_dir, 'shards')
        self.index = np.load(os.path.join(self.dir, 'index.npy'))
        self.fds = {}

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        from PIL import Image
        shard, offset, length = (int(v) for v in self.index[i])
        if shard not in self.fds:
            self.fds[shard] = os.open(os.path.join(self.dir, f'shard-{shard:05d}.bin'), os.O_RDONLY)
        data = os.pread(self.fds[shard], length, offset)
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert('RGB'))

    def __getstate__(self):  # open file descriptors do not travel to spawned workers
        return {**self.__dict__, 'fds': {}}


class VLMDataset:
    """One split of a prepared dataset: records from <split>.jsonl, pixels memory-mapped from
    images.npy (or decoded from shards/). A training record with several captions and no turns
    becomes one sample per caption (expand_captions), so every caption is trained on."""

    def __init__(self, data_dir, split, max_samples=0, expand_captions=None):
        sharded = os.path.exists(os.path.join(data_dir, 'shards', 'index.npy'))
        for name in ('meta.json', 'shards/index.npy' if sharded else 'images.npy', f'{split}.jsonl'):
            if not os.path.exists(os.path.join(data_dir, name)):
                raise SystemExit(f"data error: {os.path.join(data_dir, name)} not found; "
                                 f"make it with: python prepare_data.py <source> --out_dir={data_dir}")
        with open(os.path.join(data_dir, 'meta.json')) as f:
            self.meta = json.load(f)
        self.data_dir = data_dir
        self.images = self._open_images()
        expand = split == 'train' if expand_captions is None else expand_captions
        self.records = []
        path = os.path.join(data_dir, f'{split}.jsonl')
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if max_samples and len(self.records) >= max_samples:
                    break
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f'data error: {path} line {lineno} is not valid JSON ({e.msg})')
                if expand and not r.get('turns') and len(r.get('captions', [])) > 1:
                    self.records += [{**r, 'captions': [c]} for c in r['captions']]
                else:
                    self.records.append(r)
        if max_samples:
            self.records = self.records[:max_samples]

    def _open_images(self):
        if os.path.exists(os.path.join(self.data_dir, 'shards', 'index.npy')):
            return ShardImages(self.data_dir)
        return np.load(os.path.join(self.data_dir, 'images.npy'), mmap_mode='r')

    def __getstate__(self):  # to a spawned DataLoader worker: reopen the memory map, do not copy it
        return {**self.__dict__, 'images': None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.images = self._open_images()

    def __len__(self):
        return len(self.records)

    def texts(self):
        for r in self.records:
            for t in r.get('turns', []):
                yield t['content']
            yield from r.get('captions', [])


CAPTION_PROMPT = 'describe the image.'


def conversation(record, caption_prompt=CAPTION_PROMPT):
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
        p = max((i + 1 for i, t in enumerate(one) if t == tokenizer.image_token_id), default=0)  # 0: bridge
        if ids is None:
            ids, sup, pos, seg = one[:p], one_sup[:p], list(range(p)), [0] * p
        ids, sup = ids + one[p:], sup + one_sup[p:]
        pos, seg = pos + list(range(p, len(one))), seg + [k // 2 + 1] * (len(one) - p)
    return ids, sup, pos, seg


def encode_sample(tokenizer, turns, num_image_tokens, max_len, isolate_turns=False):
    """(ids, targets, positions, segment_ids, truncated) for one conversation. Too long: whole trailing
    turn pairs are dropped; if the first pair alone is still too long, its tail is cut (the image is
    always kept whole; max_seq_len below the image tokens is a config error). targets[t] is the next
    token where that token is supervised, else IGNORE_INDEX. truncated is 0 when nothing was cut."""
    truncated = 0
    while True:
        ids, sup, pos, seg = pack_turns(tokenizer, turns, num_image_tokens, isolate_turns)
        if len(ids) <= max_len or len(turns) <= 2:
            break
        turns, truncated = turns[:-2], truncated + 2
    if len(ids) > max_len:
        image_end = max((i for i, t in enumerate(ids) if t == tokenizer.image_token_id), default=-1) + 1
        if image_end >= max_len:
            raise SystemExit(f'config error: max_seq_len={max_len} leaves no room after the {num_image_tokens} '
                             f'image tokens; raise max_seq_len')
        ids, sup, pos, seg = ids[:max_len], sup[:max_len], pos[:max_len], seg[:max_len]
        truncated += 1
    targets = [t if s and sg == sg_prev else IGNORE_INDEX
               for t, s, sg, sg_prev in zip(ids[1:], sup[1:], seg[1:], seg[:-1])] + [IGNORE_INDEX]
    return ids, targets, pos, seg, truncated


def collate(dataset, indices, tokenizer, num_image_tokens, max_len, stats=None, isolate_turns=False):
    """Right-padded batch: input_ids, targets (IGNORE_INDEX at padding), attention_mask, images,
    and positions and segment_ids when turns are isolated. stats['truncated'] counts the samples
    cut to fit max_len (none is dropped)."""
    if isinstance(tokenizer, HFProcessor):  # a whole Hugging Face VLM: its processor builds the batch
        return hf_collate(tokenizer, dataset, indices, max_len, stats)
    seqs, rows = [], []
    for i in indices:
        r = dataset.records[i]
        enc = encode_sample(tokenizer, conversation(r), num_image_tokens, max_len, isolate_turns)
        if stats is not None and enc[4]:
            stats['truncated'] += 1
        seqs.append(enc)
        rows.append(r['image'])
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


def answer_spans(processor, messages):
    """The rendered conversation and the character span of each assistant turn in it: from the end of the
    generation prompt to the end of the turn (the rendering of the turns up to it)."""
    text, spans = processor.render(messages), []
    for k, m in enumerate(messages):
        if m['role'] == 'assistant':
            head, upto = processor.render(messages[:k], True), processor.render(messages[:k + 1])
            if not (upto.startswith(head) and text.startswith(upto)):
                raise SystemExit(f'model error: the chat template of {processor.source} renders assistant turn {k} '
                                 f'differently once more turns follow, so its answers cannot be located')
            spans.append((len(head), len(upto)))
    return text, spans


def hf_collate(processor, dataset, indices, max_len, stats=None):
    """collate() for an HFVLM: each conversation rendered by the model's chat template and run with its image
    through the model's processor (right-padded), which expands the image into the model's image tokens.
    targets as collate's: the next token where that token is part of an assistant answer (its text and the
    end-of-turn token after it), else IGNORE_INDEX. A row longer than max_len loses its tail (never the image)."""
    from PIL import Image
    texts, spans = zip(*(answer_spans(processor, processor.messages(conversation(dataset.records[i])))
                         for i in indices))
    images = [[Image.fromarray(np.asarray(dataset.images[dataset.records[i]['image']]))] for i in indices]
    processor.tokenizer.padding_side = 'right'
    batch = dict(processor.processor(text=list(texts), images=images, return_tensors='pt', padding=True))
    ids = batch['input_ids']  # (B, T)
    targets = torch.full_like(ids, IGNORE_INDEX)
    special = set(processor.tokenizer.all_special_ids) | {
        i for i, t in processor.tokenizer.added_tokens_decoder.items() if t.special}
    for b, (text, row_spans) in enumerate(zip(texts, spans)):
        # the text tokenized as it is, its image placeholder not expanded: the offsets locate the answers. After
        # the placeholder both tokenizations agree, so plain token j is token j + shift of the processed row.
        plain = processor.tokenizer(text, return_offsets_mapping=True)
        u, offsets = plain['input_ids'], plain['offset_mapping']
        n = int(batch['attention_mask'][b].sum())
        img, shift = max(j for j, t in enumerate(u) if t == processor.image_token_id), n - len(u)
        if ids[b, img + 1 + shift:n].tolist() != u[img + 1:]:
            raise SystemExit(f'model error: the processor of {processor.source} changes the text after the image, '
                             f'so the answer tokens cannot be located')
        for start, end in row_spans:
            sup = [j for j, (a, z) in enumerate(offsets) if z > start and a < end]
            eot = next((j for j in sup if u[j] in special), None)
            if eot is None:
                raise SystemExit(f'model error: the chat template of {processor.source} ends an assistant turn '
                                 f'without a special (end-of-turn) token; there is nothing to stop generation at')
            for j in sup[:sup.index(eot) + 1]:
                if j > img:  # the image is in the first user turn, before every answer
                    targets[b, j + shift - 1] = u[j]
    if ids.shape[1] > max_len:
        long = batch['attention_mask'].sum(1) > max_len
        image_end = max(int(r.nonzero().max()) for r in ids == processor.image_token_id)
        if image_end >= max_len - 1:
            raise SystemExit(f'config error: max_seq_len={max_len} leaves no room after the image tokens '
                             f'({image_end + 1}); raise max_seq_len')
        if stats is not None:
            stats['truncated'] += int(long.sum())
        batch = {k: v[:, :max_len] if v.shape == ids.shape else v for k, v in batch.items()}
        targets = targets[:, :max_len]
        targets[:, -1] = IGNORE_INDEX  # its next token was cut
    batch['targets'] = targets
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


class StepBatches(torch.utils.data.Dataset):
    """Item k: this process's grad_accum micro-batches of optimizer step k after `order`'s current
    position, and how many of its samples were truncated. Each item recomputes its indices from
    (epoch, cursor), so DataLoader workers build steps ahead, in any order, with the data order of
    an inline run (and of a resumed one)."""

    def __init__(self, dataset, order, batch_size, grad_accum, world_size, rank, encode_args):
        self.dataset, self.n, self.seed = dataset, order.n, order.seed
        self.start = order.epoch * order.n + order.cursor
        self.batch_size, self.grad_accum, self.world_size, self.rank = batch_size, grad_accum, world_size, rank
        self.encode_args = encode_args  # (tokenizer, num_image_tokens, max_len, isolate_turns)
        self.epoch, self.perm = None, None

    def __len__(self):
        return 1 << 62  # endless: epochs follow one another

    def __getitem__(self, k):
        need = self.batch_size * self.grad_accum * self.world_size
        pos, idx = self.start + k * need, []
        while len(idx) < need:  # DataOrder.take from position pos, one epoch's permutation kept at a time
            epoch, cursor = divmod(pos, self.n)
            if self.epoch != epoch:
                self.epoch, self.perm = epoch, DataOrder(self.n, self.seed, epoch)._perm
            step = min(need - len(idx), self.n - cursor)
            idx, pos = idx + self.perm[cursor:cursor + step], pos + step
        tok, n_img, max_len, isolate = self.encode_args
        stats, micro = Counter(), []
        for m in range(self.grad_accum):
            s = (m * self.world_size + self.rank) * self.batch_size
            micro.append(collate(self.dataset, idx[s:s + self.batch_size], tok, n_img, max_len, stats, isolate))
        return micro, stats['truncated']


def _one_thread(worker_id):  # a worker builds batches; the training step keeps the cores
    torch.set_num_threads(1)


def step_batches(dataset, order, batch_size, grad_accum, world_size, rank, encode_args, num_workers=0):
    """Endless (micro-batches, truncated) per optimizer step; num_workers > 0 builds them in that many
    DataLoader processes, two steps ahead each (decoding --shards images, tokenizing)."""
    steps = StepBatches(dataset, order, batch_size, grad_accum, world_size, rank, encode_args)
    if num_workers == 0:
        return (steps[k] for k in itertools.count())
    loader = torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=num_workers,
                                         prefetch_factor=2, persistent_workers=True,
                                         worker_init_fn=_one_thread)
    return iter(loader)


def vlm_config(c, tok, llm=None):
    """The model of a training config (train_vlm.py's keys), for this tokenizer. llm: a pretrained Decoder or
    HFCausalLM (load_pretrained_llm), whose config replaces the llm_* keys."""
    llm_cfg = llm.cfg if llm is not None else DecoderConfig(
        vocab_size=tok.vocab_size, n_layer=c['llm_layers'], n_head=c['llm_heads'], n_kv_head=c['llm_kv_heads'],
        n_embd=c['llm_width'], intermediate_size=c['llm_mlp_width'], tie_embeddings=c['tie_embeddings'])
    return VLMConfig(
        vision=ViTConfig(image_size=c['image_size'], patch_size=c['patch_size'], patch_overlap=c['patch_overlap'],
                         n_layer=c['vit_layers'], n_head=c['vit_heads'], n_embd=c['vit_width']),
        connector=ConnectorConfig(kind=c['connector'], in_dim=c['vit_width'], out_dim=llm_cfg.n_embd,
                                  scale_factor=c['pixel_shuffle_factor'], n_head=c['bridge_heads']),
        llm=llm_cfg, image_token_id=tok.image_token_id,
        hf_llm=llm.model.config.to_dict() if isinstance(llm, HFCausalLM) else None)


def load_vision_tower(c):
    """(ViTConfig, weights) of c['vision']: a train_siglip.py or train_vlm.py out_dir (it holds ckpt.pt), or
    a SigLIP, CLIP or DINOv2 checkpoint (a directory or a model id in the Hugging Face cache)."""
    if os.path.isfile(os.path.join(c['vision'], 'ckpt.pt')):
        if c['vision_cls']:
            raise SystemExit(f"config error: vision_cls=True but {c['vision']} holds a glimpse ViT, which has no "
                             f"class token")
        return run_vision_tower(c['vision'], c['vision_layer'])
    return load_pretrained_vision(c['vision'], c['vision_layer'], c['vision_cls'])


def pretrained_vision(c, model_cfg):
    """A pretrained vision tower (c['vision'] other than 'scratch'): its config replaces model_cfg.vision
    (the connector's input width follows) and its weights are returned, to load once the VLM is built.
    Returns None for 'scratch'."""
    if c['vision'] == 'scratch':
        if c['vision_layer'] != -1 or c['vision_cls']:
            raise SystemExit("config error: vision_layer and vision_cls choose features of a pretrained tower; "
                             "with vision='scratch' leave them at -1 and False (the vit_* keys shape the ViT)")
        return None
    model_cfg.vision, weights = load_vision_tower(c)
    model_cfg.connector.in_dim = model_cfg.vision.n_embd
    if model_cfg.vision.keep_cls and model_cfg.connector.kind == 'pixel_shuffle':
        raise SystemExit("config error: vision_cls=True adds a token to the patch grid, which pixel_shuffle cannot "
                         "fold; use connector='mlp'")
    return weights


# -----------------------------------------------------------------------------
# optimisation

def lr_at(it, learning_rate, min_lr, warmup_iters, max_iters):
    """Linear warmup, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def make_optimizer(model, learning_rate, weight_decay, betas, device_type, optimizer='adamw', lr_scales=None):
    """AdamW over the trainable parameters; weight decay on matrices only (not on norms, biases or learned
    positions). lr_scales {'llm': 0.1, ...}: a component's learning rate relative to the schedule's
    (each group keeps its 'lr_scale'). optimizer 'adamw8bit' / 'paged_adamw': bitsandbytes, CUDA only."""
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = (lr_scales or {}).get(n.split('.')[0], 1.0)
        decay = p.dim() >= 2 and 'pos_embed' not in n
        g = groups.setdefault((scale, decay), {'params': [], 'weight_decay': weight_decay if decay else 0.0,
                                               'lr_scale': scale, 'lr': learning_rate * scale})
        g['params'].append(p)
    groups = list(groups.values())
    if optimizer == 'adamw':
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')
    if optimizer not in ('adamw8bit', 'paged_adamw'):
        raise SystemExit(f"config error: --optimizer={optimizer!r}: use 'adamw', 'adamw8bit' or 'paged_adamw'")
    if device_type != 'cuda':
        raise SystemExit(f"config error: --optimizer={optimizer} needs CUDA (bitsandbytes 8-bit and paged "
                         f"optimizer states); on {device_type} use --optimizer=adamw")
    import bitsandbytes as bnb
    opt = bnb.optim.AdamW8bit if optimizer == 'adamw8bit' else bnb.optim.PagedAdamW
    return opt(groups, lr=learning_rate, betas=betas)


# -----------------------------------------------------------------------------
# what trains: per component 'full', 'frozen', 'lora' or 'qlora'

MODES = ('frozen', 'full', 'lora', 'qlora')


def trains_everything(c):
    return c.get('vision_mode', 'full') == c.get('llm_mode', 'full') == 'full'


def load_llm(source):
    """(tokenizer, LLM module) of train_vlm.py's llm= other than 'scratch': the out_dir of a train_vlm.py run
    (its language model as trained, adapters merged, and its tokenizer), or a pretrained LLM (a Hugging
    Face directory or cache id, or a .gguf file: model.load_pretrained_llm)."""
    path = os.path.join(source, 'ckpt.pt')
    if not os.path.isfile(path):
        return load_pretrained_llm(source)
    ckpt = load_checkpoint(path)
    if 'connector' not in ckpt.get('model_config', {}):
        raise SystemExit(f'llm error: {path} was not written by train_vlm.py; llm= takes a train_vlm.py out_dir, '
                         f'a Hugging Face model directory or cache id, or a .gguf file')
    return Tokenizer.from_state(ckpt['tokenizer']), merge_lora(load_vlm(ckpt, 'cpu')).llm


def load_pretrained_parts(c):
    """(LLM module or None, vision tower state dict or None) for the pretrained parts config c names."""
    llm = load_llm(c['llm'])[1] if c.get('llm', 'scratch') != 'scratch' else None
    vision = load_vision_tower(c)[1] if c.get('vision', 'scratch') != 'scratch' else None
    return llm, vision


def base_vlm(model_cfg, c, init_from, seed, device, pretrained=None):
    """The model before any training of a run: seeded initial weights around the pretrained LLM and vision
    tower that config c names, or the weights of the earlier run in the directory init_from (its adapters
    merged). pretrained: those parts, when the caller has loaded them already."""
    if init_from not in ('scratch', 'resume'):
        earlier = merge_lora(load_vlm(load_checkpoint(os.path.join(init_from, 'ckpt.pt')), 'cpu'))
        model = VLM(model_cfg)
        model.load_state_dict(earlier.state_dict())
        return model.to(device)
    llm, vision = pretrained or load_pretrained_parts(c)
    seed_everything(seed)  # after loading, which may draw random numbers: the same init on every rebuild
    model = VLM(model_cfg, llm=llm)
    if vision is not None:
        model.vision_tower.load_state_dict(vision)
    return model.to(device)


def set_mode(module, part, c):
    """Freeze, train, or adapt with LoRA / QLoRA one part: c['vision_mode'] or c['llm_mode']."""
    mode = c.get(f'{part}_mode', 'full')
    if mode not in MODES:
        raise SystemExit(f"config error: --{part}_mode={mode!r}: use one of {', '.join(MODES)}")
    if mode in ('frozen', 'full'):
        module.requires_grad_(mode == 'full')
    else:
        if mode == 'qlora' and c['qlora_quant_type'] not in ('nf4', 'fp4'):
            raise SystemExit(f"config error: --qlora_quant_type={c['qlora_quant_type']!r}: use 'nf4' or 'fp4'")
        apply_lora(module, c['lora_targets'], c['lora_r'], c['lora_alpha'], c['lora_dropout'], c['rslora'],
                   quantize=c['qlora_quant_type'] if mode == 'qlora' else None,
                   double_quant=c['qlora_double_quant'], compute_dtype=getattr(torch, c['dtype']))


def setup_modes(model, c):
    """Freeze, train, or adapt with LoRA / QLoRA the vision tower and the LLM (c['vision_mode'],
    c['llm_mode']); the connector always trains."""
    for part, module in (('vision', model.vision_tower), ('llm', model.llm)):
        set_mode(module, part, c)
    if isinstance(model.llm, HFCausalLM):
        if c.get('grad_checkpointing', False):  # the Hugging Face model's own block checkpointing
            model.llm.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={'use_reentrant': False, 'context_fn': checkpoint_context})
    else:
        model.llm.grad_checkpointing = c.get('grad_checkpointing', False)


def build_vlm(model_cfg, c, device, ckpt=None, source='checkpoint', pretrained=None):
    """The model of config c on device, set up per c's modes, with ckpt's weights if given. A run that
    does not train everything saves only what it trained plus ckpt['base']: how to rebuild its base
    (seeded init or an earlier run) and a fingerprint to check it against. Returns (model, base)."""
    if ckpt and 'base' not in ckpt:  # full weights
        if not trains_everything(c):
            raise SystemExit(f'checkpoint error: {source} trained every part in full; resume it with --vision_mode=full '
                             f'--llm_mode=full, or adapt it in a new run with --init_from=<its out_dir>')
        model = VLM(model_cfg)
        model.load_state_dict(ckpt['model'])
        setup_modes(model.to(device), c)
        return model, None
    init_from = ckpt['base']['init_from'] if ckpt else c['init_from']
    seed = ckpt['base']['seed'] if ckpt else c['seed']
    model = base_vlm(model_cfg, c, 'scratch' if init_from == 'resume' else init_from, seed, device, pretrained)
    base = None if trains_everything(c) else dict(base_fingerprint(model), init_from=init_from, seed=seed)
    if ckpt:
        check_fingerprint(ckpt['base'], base or base_fingerprint(model), source)
    setup_modes(model, c)
    if ckpt:
        load_trained_state_dict(model, ckpt['model'], source)
    return model, base


def build_hf_vlm(c, device, ckpt=None, source='checkpoint'):
    """The Hugging Face VLM c['hf_vlm'] on device, its vision tower and language model set up per c's modes,
    everything else (connector, output head) frozen; with ckpt's trained tensors if given. Like build_vlm's
    partial checkpoints, its checkpoints hold only what trained, and base: the model's name and fingerprint,
    which a rebuilt base must match. Returns (model, base)."""
    if c['init_from'] not in ('scratch', 'resume'):
        raise SystemExit(f"config error: --init_from={c['init_from']!r}: a hf_vlm run starts from its Hugging Face "
                         f"model ('scratch') or resumes ('resume')")
    if any(c.get(k) for k in ('vision_lr', 'connector_lr', 'llm_lr')):
        raise SystemExit('config error: vision_lr, connector_lr and llm_lr name glimpse\'s own parts; with hf_vlm '
                         'leave them at 0 (learning_rate applies to everything that trains)')
    if c.get('isolate_turns'):
        raise SystemExit('config error: isolate_turns=True needs glimpse\'s own VLM; hf_vlm runs train whole '
                         'conversations')
    name = c['hf_vlm']  # a moved model directory can be given anew: the fingerprint checks it
    model = HFVLM(name, c.get('trust_remote_code', False)).to(device)
    base = dict(base_fingerprint(model), hf_vlm=name)
    if ckpt:
        check_fingerprint(ckpt['base'], base, source)
    model.requires_grad_(False)
    set_mode(model.vision_tower, 'vision', c)
    set_mode(model.llm, 'llm', c)
    if c.get('llm_mode') == 'full':  # the output head sits outside the language model in these models
        model.model.get_output_embeddings().requires_grad_(True)
    if c.get('grad_checkpointing', False):
        model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={'use_reentrant': False, 'context_fn': checkpoint_context})
    if ckpt:
        load_trained_state_dict(model, ckpt['model'], source)
    return model, base


def load_vlm(ckpt, device):
    """The model of a checkpoint, as it was trained (LoRA adapters on a rebuilt base, or full weights)."""
    if ckpt['config'].get('hf_vlm'):
        return build_hf_vlm(ckpt['config'], device, ckpt)[0]
    return build_vlm(VLMConfig.from_dict(ckpt['model_config']), ckpt['config'], device, ckpt)[0]


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


def run_vision_tower(out_dir, layer=-1):
    """(ViTConfig, weights) of the image tower of an earlier run, for train_vlm.py's vision=<out_dir>: a
    train_siglip.py run (stage 1), or a train_vlm.py run (its tower as trained, e.g. the shapes recipe's,
    to align a new language model to; a tower that run kept frozen comes from that run's own source).
    layer: the block whose output is the tower's (-1 the last, with its final LayerNorm; -2 the
    penultimate's raw output, as LLaVA takes CLIP's; 1..L from the first); later blocks are dropped."""
    cfg, weights = _run_vision_tower(out_dir)
    n_keep = blocks_kept(layer, cfg.n_layer, out_dir)
    if n_keep == cfg.n_layer:
        return cfg, weights
    keep = lambda k: not k.startswith('ln_post.') and not (k.startswith('blocks.') and int(k.split('.')[1]) >= n_keep)
    return replace(cfg, n_layer=n_keep, post_norm=False), {k: v for k, v in weights.items() if keep(k)}


def _run_vision_tower(out_dir):
    path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(path):
        raise SystemExit(f"vision error: {path} not found; vision= takes 'scratch' or the out_dir of a "
                         f"train_siglip.py or train_vlm.py run")
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    cfg = ckpt.get('model_config', {})
    if 'vision' in cfg and 'connector' in cfg:  # a VLM
        vlm = load_vlm(ckpt, 'cpu')
        return vlm.cfg.vision, vlm.vision_tower.state_dict()
    if 'image_tower' not in cfg:
        raise SystemExit(f'vision error: {path} was not written by train_siglip.py or train_vlm.py '
                         f'(its model_config has neither image_tower nor vision)')
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


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
