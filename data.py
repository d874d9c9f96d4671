"""
glimpse's one on-disk format, read and written in one place, and the batches training builds from it:

    data/<name>/images.npy       uint8 (N, S, S, 3), memory-mapped when training
      or data/<name>/shards/     encoded images (PNG or JPEG) in shard-*.bin files and index.npy, int64
                                 (N, 3) = (shard, byte offset, byte length) of each row, decoded per batch
    data/<name>/{train,val,test}.jsonl
                                 one sample a line: {"id", "image": its row, "turns": [{"role", "content"}],
                                 "captions": [...], "label": int or null, "qa": [{"q", "a", "type"}]};
                                 the first user turn holds the placeholder "<image>"; a sample about several
                                 images has the list of their rows, and one "<image>" per image in its turns
    data/<name>/meta.json        source, image size, class names, counts, what was skipped
    data/<name>/skipped.txt      every skipped image or row, with its path or line number

DatasetWriter writes it (prepare_data.py turns each source into it); VLMDataset reads it, its records indexed by
byte offset and parsed when asked for (Records). collate() turns samples into padded batches (pack_turns,
encode_sample: which tokens carry the loss), caption_batch() stage 1's; DataOrder and step_batches give a seeded,
resumable order. fit() is the one resize to a dataset's square images, used
when a dataset is prepared and when sample.py or classify.py read an image (image_pixels).
"""
import io
import itertools
import json
import os
import shutil
from array import array
from collections import Counter

import numpy as np
import torch
from PIL import Image

from errors import GlimpseError
from model import IGNORE_INDEX
from tokenizer import HFProcessor

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
SHARD_BYTES = 256 << 20  # a new shard file every 256 MiB


# -----------------------------------------------------------------------------
# images: any file, any mode -> RGB at a square size

def to_rgb(img):
    """Any PIL mode -> RGB. 16- and 32-bit greyscale are scaled to 8 bits (not clipped: clipping
    turns a 16-bit image white); transparency is composited on white, as a viewer shows it."""
    if img.mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F'):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith('I;16') or a.max() > 255 else 255.0
        hi = 1.0 if img.mode == 'F' and a.max() <= 1.0 else hi
        img = Image.fromarray(np.clip(a * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8), 'L')
    if img.mode == 'P':
        img = img.convert('RGBA')  # a palette can carry a transparent index
    if img.mode in ('LA', 'PA', 'RGBA', 'La', 'RGBa'):
        img = img.convert('RGBA')
        img = Image.alpha_composite(Image.new('RGBA', img.size, (255, 255, 255, 255)), img)
    return img.convert('RGB')


def fit(img, size, resize):
    """'crop': scale the short side to size and cut the center square; 'pad': scale the long side
    to size and pad with black to a square (the whole image is kept)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if resize == 'crop':
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        return img.crop((left, top, left + size, top + size))
    s = size / max(w, h)
    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    out = Image.new('RGB', (size, size))
    out.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return out


_hf_parts = None  # {split: datasets.Dataset} in each worker of the hf source

def open_image(path):
    """An image file -> an RGB PIL image (as to_rgb), or a one-line error naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise GlimpseError(f'image error: {path} not found')
    except (OSError, ValueError) as e:  # PIL's errors for a file that is not an image, or a truncated one
        raise GlimpseError(f'image error: cannot read {path} ({type(e).__name__}: {e}); give a PNG or JPEG file')


def image_pixels(image, size=None, resize='crop'):
    """An image to ask a model about (a path, a PIL image or an (H, W, 3) uint8 array) -> uint8 (size, size, 3),
    fitted as prepare_data.py fits a dataset's images (the model's tower then resizes as it was trained);
    size None: the image as it is (a Hugging Face VLM's processor resizes it itself)."""
    if isinstance(image, np.ndarray) and (size is None or image.shape[:2] == (size, size)):
        return np.asarray(image, dtype=np.uint8)
    img = open_image(image) if isinstance(image, (str, os.PathLike)) else \
        to_rgb(image) if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    return np.asarray(img if size is None else fit(img, size, resize), dtype=np.uint8)


# -----------------------------------------------------------------------------
# writing

class ShardWriter:
    """Encoded images appended to shard-*.bin files; index.npy says where each row is."""

    def __init__(self, out_dir):
        self.dir = os.path.join(out_dir, 'shards')
        os.makedirs(self.dir, exist_ok=True)
        self.index, self.shard, self.offset, self.f = [], -1, SHARD_BYTES, None

    def append(self, data):
        if self.offset + len(data) > SHARD_BYTES and self.offset > 0:
            if self.f:
                self.f.close()
            self.shard, self.offset = self.shard + 1, 0
            self.f = open(os.path.join(self.dir, f'shard-{self.shard:05d}.bin'), 'wb')
        self.f.write(data)
        self.index.append((self.shard, self.offset, len(data)))
        self.offset += len(data)

    def close(self):
        if self.f:
            self.f.close()
        np.save(os.path.join(self.dir, 'index.npy'), np.array(self.index, dtype=np.int64).reshape(-1, 3))

class DatasetWriter:
    """Writes a dataset in the format above into out_dir. add() appends one sample to a split, its image as
    uint8 (S, S, 3) pixels or, with shard_format, as the encoded bytes of one; rows are numbered as they come.
    close() finishes images.npy (without the rows of skipped images) or shards/index.npy, and writes
    skipped.txt and meta.json: until then the dataset has no meta.json, so a crash never leaves one that reads
    as complete."""

    def __init__(self, out_dir, image_size, capacity, splits=('train', 'val', 'test'), shard_format=None):
        os.makedirs(out_dir, exist_ok=True)
        for name in ('images.npy', 'shards', 'meta.json'):  # a re-run in the other storage must not leave the old one
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        self.out_dir, self.size, self.shard_format = out_dir, image_size, shard_format
        if shard_format:
            self.shards = ShardWriter(out_dir)
        else:
            self.tmp = os.path.join(out_dir, 'images.npy.tmp')
            self.images = np.lib.format.open_memmap(self.tmp, mode='w+', dtype=np.uint8,
                                                    shape=(max(capacity, 1), image_size, image_size, 3))
        self.files = {s: open(os.path.join(out_dir, f'{s}.jsonl'), 'w') for s in splits}
        self.counts, self.rows = dict.fromkeys(splits, 0), 0

    def add(self, split, record, image):
        """record: the sample's fields (its 'id' first); 'image' is set to its row. image: one image, or a list
        of them (a sample about several images: 'image' is then the list of their rows, in order)."""
        rows = []
        for im in (image if isinstance(image, list) else [image]):
            if self.shard_format:
                self.shards.append(im)
            else:
                self.images[self.rows] = im
            rows.append(self.rows)
            self.rows += 1
        self.files[split].write(json.dumps({'id': record['id'], 'image': rows if isinstance(image, list) else rows[0],
                                            **{k: v for k, v in record.items() if k != 'id'}}) + '\n')
        self.counts[split] += 1

    def close(self, skipped_lines=(), **meta):
        """meta: what meta.json says besides the counts and the storage (source, class_names, ...)."""
        for f in self.files.values():
            f.close()
        if self.shard_format:
            self.shards.close()
        else:
            self.images.flush()
            capacity = len(self.images)
            del self.images
            final = os.path.join(self.out_dir, 'images.npy')
            if self.rows < capacity:  # drop the rows of skipped images
                old = np.load(self.tmp, mmap_mode='r')
                new = np.lib.format.open_memmap(final + '.tmp2', mode='w+', dtype=np.uint8,
                                                shape=(self.rows, self.size, self.size, 3))
                for s in range(0, self.rows, 4096):
                    new[s:s + 4096] = old[s:min(self.rows, s + 4096)]
                new.flush()
                del old, new
                os.replace(final + '.tmp2', final)
                os.remove(self.tmp)
            else:
                os.replace(self.tmp, final)
        with open(os.path.join(self.out_dir, 'skipped.txt'), 'w') as f:
            f.writelines(b + '\n' for b in skipped_lines)
        storage = {'storage': 'shards', 'shard_format': self.shard_format} if self.shard_format else {'storage': 'npy'}
        meta = {**meta, 'counts': self.counts, **storage}
        with open(os.path.join(self.out_dir, 'meta.json'), 'w') as f:
            json.dump(meta, f, indent=2)
        return meta


# -----------------------------------------------------------------------------
# reading and batching

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
        shard, offset, length = (int(v) for v in self.index[i])
        if shard not in self.fds:
            self.fds[shard] = os.open(os.path.join(self.dir, f'shard-{shard:05d}.bin'), os.O_RDONLY)
        data = os.pread(self.fds[shard], length, offset)
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert('RGB'))

    def __getstate__(self):  # open file descriptors do not travel to spawned workers
        return {**self.__dict__, 'fds': {}}


class Records:
    """The records of a <split>.jsonl, parsed when asked for: records[i] reads its line (os.pread, safe in forked
    DataLoader workers) and returns a fresh dict. Resident: three numpy arrays, 16 bytes a record and no Python
    object per record, so forked workers share them (copy-on-write copies none of their pages; a list of dicts
    costs ~5 KB a LLaVA record and is copied page by page as workers touch it). offsets and lengths: the
    record's line in the file; caption >= 0: the record is that caption of its line alone (expand_captions)."""

    def __init__(self, path, offsets, lengths, caption):
        self.path, self.offsets, self.lengths, self.caption = path, offsets, lengths, caption
        self.fd = None

    @classmethod
    def index(cls, path, max_samples=0, expand_captions=False):
        """One pass over the file: every line must be a JSON object (a one-line error names the line otherwise).
        expand_captions: a record with several captions and no turns is one record per caption."""
        offsets, lengths, caption = array('q'), array('i'), array('i')
        at = 0
        with open(path, 'rb') as f:
            for lineno, line in enumerate(f, 1):
                if max_samples and len(offsets) >= max_samples:
                    break
                try:
                    r = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise GlimpseError(f'data error: {path} line {lineno} is not valid JSON '
                                       f'({getattr(e, "msg", None) or e.reason})')
                if not isinstance(r, dict):
                    raise GlimpseError(f'data error: {path} line {lineno} is not a JSON object')
                n = len(r.get('captions') or []) if expand_captions and not r.get('turns') else 0
                for c in range(n) if n > 1 else [-1]:
                    offsets.append(at)
                    lengths.append(len(line))
                    caption.append(c)
                at += len(line)
        n = min(len(offsets), max_samples or len(offsets))
        return cls(path, np.frombuffer(offsets, np.int64)[:n].copy(), np.frombuffer(lengths, np.int32)[:n].copy(),
                   np.frombuffer(caption, np.int32)[:n].copy())

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices; IndexError past the end
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        r = json.loads(os.pread(self.fd, int(self.lengths[i]), int(self.offsets[i])))
        c = int(self.caption[i])
        return r if c < 0 else {**r, 'captions': [r['captions'][c]]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getstate__(self):  # an open file descriptor does not travel to a spawned worker
        return {**self.__dict__, 'fd': None}

    def __del__(self):
        if getattr(self, 'fd', None) is not None:
            os.close(self.fd)


class VLMDataset:
    """One split of a prepared dataset: records from <split>.jsonl (Records: indexed by byte offset, each parsed
    when asked for), pixels memory-mapped from images.npy (or decoded from shards/). A training record with
    several captions and no turns becomes one sample per caption (expand_captions), so every caption is trained on."""

    def __init__(self, data_dir, split, max_samples=0, expand_captions=None):
        sharded = os.path.exists(os.path.join(data_dir, 'shards', 'index.npy'))
        for name in ('meta.json', 'shards/index.npy' if sharded else 'images.npy', f'{split}.jsonl'):
            if not os.path.exists(os.path.join(data_dir, name)):
                raise GlimpseError(f"data error: {os.path.join(data_dir, name)} not found; "
                                   f"make it with: python prepare_data.py <source> --out_dir={data_dir}")
        with open(os.path.join(data_dir, 'meta.json')) as f:
            self.meta = json.load(f)
        self.data_dir = data_dir
        self.images = self._open_images()
        expand = split == 'train' if expand_captions is None else expand_captions
        self.records = Records.index(os.path.join(data_dir, f'{split}.jsonl'), max_samples, expand)

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
    """The turns to train on: the record's own, or a caption as the answer to a fixed prompt about its images."""
    if record.get('turns'):
        return record['turns']
    return [{'role': 'user', 'content': '<image>\n' * len(record_images(record)) + caption_prompt},
            {'role': 'assistant', 'content': record['captions'][0]}]


def record_images(record):
    """The rows of a record's images: its 'image' is one row, or a list of them (several images)."""
    return record['image'] if isinstance(record['image'], list) else [record['image']]


def sample_images(dataset, record, turns, tiler=None, bridge=False):
    """A record's images as the tower takes them: (uint8 (n, h, w, 3), grids for encode_chat), n = its images,
    or with a tiler (image splitting) their tiles and global views. One '<image>' per image in its turns, else a
    one-line error naming the record."""
    pics = [np.asarray(dataset.images[j]) for j in record_images(record)]
    marks = sum(t['content'].count('<image>') for t in turns)
    if marks != len(pics):
        raise GlimpseError(f"data error: record {record.get('id')!r} has {len(pics)} image(s) but {marks} '<image>' "
                           f"in its turns; write one '<image>' per image, in the order of its 'image' list")
    if bridge and len(pics) > 1:
        raise GlimpseError(f"data error: record {record.get('id')!r} has {len(pics)} images; connector='bridge' "
                           f"attends to one image a sample: train several images with an image-token connector")
    if tiler is None:
        return torch.from_numpy(np.stack(pics)), None
    return tiler.split(pics)


def pack_turns(tokenizer, turns, num_image_tokens, isolate_turns=False, grids=None):
    """Token ids, supervised flags, positions and segment ids of a conversation.
    isolate_turns=False: one causal conversation; every token is in segment 0.
    isolate_turns=True: each (user, assistant) pair becomes its own single-turn conversation about
    the image. They share one prefix, which ends with the image tokens (segment 0, computed once);
    pair k is segment k, sees only the prefix and itself, and has the positions it would have alone.
    So an answer can only come from the image, never from an earlier answer, exactly as at test time.
    Leading system turns and the first turn's text up to its last '<image>' are part of every pair (and so of
    the shared prefix); the images must all be there. grids: encode_chat's, for split images."""
    if not isolate_turns:
        ids, sup = tokenizer.encode_chat(turns, num_image_tokens, grids=grids)
        return ids, sup, list(range(len(ids))), [0] * len(ids)
    n_sys = next((i for i, t in enumerate(turns) if t['role'] != 'system'), len(turns))
    head, turns = turns[:n_sys], turns[n_sys:]
    first = turns[0]['content'] if turns else ''
    lead = first[:first.rindex('<image>') + len('<image>')] if '<image>' in first else ''
    if any('<image>' in t['content'] for t in turns[1:]):
        raise GlimpseError("data error: isolate_turns=True shares the images of the first user turn with every "
                           "question; this conversation has an '<image>' in a later turn: train with "
                           "isolate_turns=False")
    ids = sup = pos = seg = None
    for k in range(0, len(turns) - 1, 2):
        if (turns[k]['role'], turns[k + 1]['role']) != ('user', 'assistant'):
            raise GlimpseError(f"data error: isolate_turns=True needs user and assistant turns in turn (after any "
                               f"system turns); turn {n_sys + k} is {turns[k]['role']!r}, the next "
                               f"{turns[k + 1]['role']!r}")
        q = first if k == 0 else (lead + '\n' if lead else '') + turns[k]['content']
        one, one_sup = tokenizer.encode_chat(head + [{'role': 'user', 'content': q}, turns[k + 1]], num_image_tokens,
                                             grids=grids)
        p = max((i + 1 for i, t in enumerate(one) if t == tokenizer.image_token_id), default=0)  # 0: bridge
        if ids is None:
            ids, sup, pos, seg = one[:p], one_sup[:p], list(range(p)), [0] * p
        elif one[:p] != ids[:p]:
            raise GlimpseError('data error: isolate_turns=True: the question-answer pairs of a conversation do not '
                               'share the prefix up to the image (a chat template that changes it?); train with '
                               'isolate_turns=False')
        ids, sup = ids + one[p:], sup + one_sup[p:]
        pos, seg = pos + list(range(p, len(one))), seg + [k // 2 + 1] * (len(one) - p)
    if ids is None:
        raise GlimpseError('data error: a conversation without a user question and an assistant answer to train on')
    return ids, sup, pos, seg


def encode_sample(tokenizer, turns, num_image_tokens, max_len, isolate_turns=False, grids=None):
    """(ids, targets, positions, segment_ids, truncated) for one conversation. Too long: whole trailing
    turn pairs are dropped; if the first pair alone is still too long, its tail is cut (the image is
    always kept whole; max_seq_len below the image tokens is a config error). targets[t] is the next
    token where that token is supervised, else IGNORE_INDEX. truncated is 0 when nothing was cut."""
    truncated, n_sys = 0, next((i for i, t in enumerate(turns) if t['role'] != 'system'), len(turns))
    while True:
        ids, sup, pos, seg = pack_turns(tokenizer, turns, num_image_tokens, isolate_turns, grids)
        if len(ids) <= max_len or len(turns) - n_sys <= 2:
            break
        turns, truncated = turns[:-2], truncated + 2
    if len(ids) > max_len:
        image_end = max((i for i, t in enumerate(ids) if t == tokenizer.image_token_id), default=-1) + 1
        if image_end >= max_len:
            raise GlimpseError(f'config error: max_seq_len={max_len} leaves no room after the {image_end} tokens up '
                               f'to the last image token; raise max_seq_len')
        ids, sup, pos, seg = ids[:max_len], sup[:max_len], pos[:max_len], seg[:max_len]
        truncated += 1
    targets = [t if s and sg == sg_prev else IGNORE_INDEX
               for t, s, sg, sg_prev in zip(ids[1:], sup[1:], seg[1:], seg[:-1])] + [IGNORE_INDEX]
    return ids, targets, pos, seg, truncated


def pack_rows(lengths, capacity):
    """First fit, in order: sample k goes into the first row with room for it (a new row when none has).
    -> rows, each a list of sample indices in the order they were placed."""
    rows, free = [], []
    for k, n in enumerate(lengths):
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            r = len(rows)
            rows.append([])
            free.append(capacity)
        rows[r].append(k)
        free[r] -= n
    return rows


def collate(dataset, indices, tokenizer, num_image_tokens, max_len, stats=None, isolate_turns=False, pack=False,
            pad_to_max=False, tiler=None):
    """Right-padded batch: input_ids, targets (IGNORE_INDEX at padding), attention_mask, images,
    and positions and segment_ids when turns are isolated. stats['truncated'] counts the samples
    cut to fit max_len (none is dropped). pad_to_max: every batch max_len long and at least two rows long
    (attention='flex': compiled FlexAttention then takes every batch with one recompilation, for the rows).
    pack=True: whole samples share rows of up to max_len tokens (pack_rows), each with its own positions
    from 0 and sample_ids (1, 2, ... in its row; 0 at padding) so that no token attends across samples;
    images holds each sample's images (a record may have several), in the order the samples stand in the rows;
    with a tiler (tiling.Tiler: image splitting) their tiles and global views, so a sample's image token count
    depends on its images' sizes. The tower takes all of them in one call (model.VLM.embed)."""
    if isinstance(tokenizer, HFProcessor):  # a whole Hugging Face VLM: its processor builds the batch
        return hf_collate(tokenizer, dataset, indices, max_len, stats)
    seqs, pixels = [], []
    for i in indices:
        r = dataset.records[i]
        turns = conversation(r)
        x, grids = sample_images(dataset, r, turns, tiler, bridge=not num_image_tokens)
        enc = encode_sample(tokenizer, turns, num_image_tokens, max_len, isolate_turns, grids)
        if stats is not None and enc[4]:
            stats['truncated'] += 1
        seqs.append(enc)
        pixels.append(x)
    layout = pack_rows([len(s[0]) for s in seqs], max_len) if pack else [[k] for k in range(len(seqs))]
    T = max_len if pad_to_max else max(sum(len(seqs[k][0]) for k in row) for row in layout)
    if pad_to_max and len(layout) == 1:  # dynamo specialises a dimension of size 1: a row of padding, no new graph
        layout = layout + [[]]
    batch = dict(input_ids=torch.full((len(layout), T), tokenizer.pad_id, dtype=torch.long),
                 targets=torch.full((len(layout), T), IGNORE_INDEX, dtype=torch.long),
                 attention_mask=torch.zeros((len(layout), T), dtype=torch.bool),
                 positions=torch.zeros((len(layout), T), dtype=torch.long),
                 segment_ids=torch.zeros((len(layout), T), dtype=torch.long),
                 sample_ids=torch.zeros((len(layout), T), dtype=torch.long))
    for b, row in enumerate(layout):
        at = 0
        for j, k in enumerate(row, 1):
            ids, tg, pos, seg, _ = seqs[k]
            span = slice(at, at + len(ids))
            batch['input_ids'][b, span], batch['targets'][b, span] = torch.tensor(ids), torch.tensor(tg)
            batch['positions'][b, span], batch['segment_ids'][b, span] = torch.tensor(pos), torch.tensor(seg)
            batch['attention_mask'][b, span], batch['sample_ids'][b, span] = True, j
            at += len(ids)
    if not pack:
        del batch['sample_ids']
        if not isolate_turns:
            del batch['positions']
    if not isolate_turns:
        del batch['segment_ids']
    batch['images'] = torch.cat([pixels[k] for row in layout for k in row])
    return batch


def answer_spans(processor, messages):
    """The rendered conversation and the character span of each assistant turn in it: from the end of the
    generation prompt to the end of the turn (the rendering of the turns up to it)."""
    text, spans = processor.render(messages), []
    for k, m in enumerate(messages):
        if m['role'] == 'assistant':
            head, upto = processor.render(messages[:k], True), processor.render(messages[:k + 1])
            if not (upto.startswith(head) and text.startswith(upto)):
                raise GlimpseError(f'model error: the chat template of {processor.source} renders assistant turn {k} '
                                   f'differently once more turns follow, so its answers cannot be located')
            spans.append((len(head), len(upto)))
    return text, spans


def hf_collate(processor, dataset, indices, max_len, stats=None):
    """collate() for an HFVLM: each conversation rendered by the model's chat template and run with its image
    through the model's processor (right-padded), which expands the image into the model's image tokens.
    targets as collate's: the next token where that token is part of an assistant answer (its text and the
    end-of-turn token after it), else IGNORE_INDEX. A row longer than max_len loses its tail (never the image)."""
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
            raise GlimpseError(f'model error: the processor of {processor.source} changes the text after the image, '
                               f'so the answer tokens cannot be located')
        for start, end in row_spans:
            sup = [j for j, (a, z) in enumerate(offsets) if z > start and a < end]
            eot = next((j for j in sup if u[j] in special), None)
            if eot is None:
                raise GlimpseError(f'model error: the chat template of {processor.source} ends an assistant turn '
                                   f'without a special (end-of-turn) token; there is nothing to stop generation at')
            for j in sup[:sup.index(eot) + 1]:
                if j > img:  # the image is in the first user turn, before every answer
                    targets[b, j + shift - 1] = u[j]
    if ids.shape[1] > max_len:
        long = batch['attention_mask'].sum(1) > max_len
        image_end = max(int(r.nonzero().max()) for r in ids == processor.image_token_id)
        if image_end >= max_len - 1:
            raise GlimpseError(f'config error: max_seq_len={max_len} leaves no room after the image tokens '
                               f'({image_end + 1}); raise max_seq_len')
        if stats is not None:
            stats['truncated'] += int(long.sum())
        batch = {k: v[:, :max_len] if v.shape == ids.shape else v for k, v in batch.items()}
        targets = targets[:, :max_len]
        targets[:, -1] = IGNORE_INDEX  # its next token was cut
    batch['targets'] = targets
    return batch


def caption_batch(dataset, indices, stats=None, rows=None):
    """train_siglip.py's micro-batch: for the records rows[i] of indices (rows: record indices, None: all),
    {'images': uint8 (B, S, S, 3), 'captions': each image's list of captions}. stats: unused (collate's)."""
    recs = [dataset.records[int(i if rows is None else rows[i])] for i in indices]
    return {'images': torch.from_numpy(np.stack([np.asarray(dataset.images[r['image']]) for r in recs])),
            'captions': [r['captions'] for r in recs]}


class DataOrder:
    """A seeded permutation of the n samples per epoch. A position counts samples from the start of epoch 0;
    its state, (epoch, cursor), is what a checkpoint keeps, so a resumed run goes on in the same order."""

    def __init__(self, n, seed, epoch=0, cursor=0):
        self.n, self.seed, self.position = n, seed, epoch * n + cursor
        self._epoch, self._perm = None, None  # one epoch's permutation, kept

    def permutation(self, epoch):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def indices(self, start, k):
        """The k sample indices from position start on, across epoch boundaries."""
        out = []
        while len(out) < k:
            epoch, cursor = divmod(start + len(out), self.n)
            out += self.permutation(epoch)[cursor:cursor + k - len(out)]
        return out

    def take(self, k):
        """The next k indices; the position moves past them."""
        out = self.indices(self.position, k)
        self.position += k
        return out

    def state(self, position=None):
        """{'epoch', 'cursor'} of the current position (or of the position given)."""
        epoch, cursor = divmod(self.position if position is None else position, self.n)
        return {'epoch': epoch, 'cursor': cursor}


class StepBatches(torch.utils.data.Dataset):
    """Item k: this process's grad_accum micro-batches of optimizer step k after `order`'s current
    position, how many of its samples were truncated, and the data order's state after the step (what a
    checkpoint written after it keeps). Each item computes its indices from its position alone, so
    DataLoader workers build steps ahead, in any order, with the data order of an inline run (and of a
    resumed one). collate_fn(dataset, indices, stats, **collate_args) makes a micro-batch: collate, or
    caption_batch for train_siglip.py."""

    def __init__(self, dataset, order, batch_size, grad_accum, world_size, rank, collate_args, collate_fn=collate):
        self.dataset, self.order = dataset, DataOrder(order.n, order.seed, **order.state())  # a copy of its own
        self.batch_size, self.grad_accum, self.world_size, self.rank = batch_size, grad_accum, world_size, rank
        self.collate_args = collate_args  # collate's keywords: tokenizer, num_image_tokens, max_len, ...
        self.collate_fn = collate_fn

    def __len__(self):
        return 1 << 62  # endless: epochs follow one another

    def __getitem__(self, k):
        need = self.batch_size * self.grad_accum * self.world_size  # samples in one step over all processes
        start = self.order.position + k * need
        idx = self.order.indices(start, need)
        stats, micro = Counter(), []
        for m in range(self.grad_accum):
            s = (m * self.world_size + self.rank) * self.batch_size
            micro.append(self.collate_fn(self.dataset, idx[s:s + self.batch_size], stats=stats, **self.collate_args))
        return micro, stats['truncated'], self.order.state(start + need)


def _one_thread(worker_id):  # a worker builds batches; the training step keeps the cores
    torch.set_num_threads(1)


def step_batches(dataset, order, batch_size, grad_accum, world_size, rank, collate_args, num_workers=0,
                 collate_fn=collate):
    """Endless (micro-batches, truncated, data-order state) per optimizer step; num_workers > 0 builds them in that many
    DataLoader processes, two steps ahead each (decoding --shards images, tokenizing)."""
    steps = StepBatches(dataset, order, batch_size, grad_accum, world_size, rank, collate_args, collate_fn)
    if num_workers == 0:
        return (steps[k] for k in itertools.count())
    loader = torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=num_workers,
                                         prefetch_factor=2, persistent_workers=True,
                                         worker_init_fn=_one_thread)
    return iter(loader)
