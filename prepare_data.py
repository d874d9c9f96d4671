"""
Turn a source into glimpse's one on-disk format: data/<name>/ with images.npy (uint8 (N, H, W, 3)) or,
with --shards, shards/ (encoded images, for datasets too large for raw pixels); {train,val,test}.jsonl, one
sample a line ({"id", "image": its row, "turns", "captions", "label", "qa"}); meta.json; skipped.txt.
data.py describes, writes and reads it.

Sources:
    python prepare_data.py shapes [--n_train 50000 ...]   synthetic scenes, no download (the default)
    python prepare_data.py cifar10 --root cifar-10-batches-py [--descriptions descriptions.csv]
    python prepare_data.py coco --annotations captions_train2017.json --images train2017/
    python prepare_data.py llava --json llava_v1_5_mix665k.json --images llava_images/
    python prepare_data.py imagefolder --root pets/          (one sub-folder per class)
    python prepare_data.py csv --csv data.csv --image_column path --text_columns caption [--label_column y]
    python prepare_data.py hf --dataset user/name_or_save_to_disk_dir [--image_column img --label_column y]
    python prepare_data.py --inspect data/<name>             counts, text lengths, samples, contact_sheet.png

Labelled sources (cifar10 without descriptions, imagefolder, hf, csv with only a label) become
classification conversations: "<image> what is in the image?" -> the class name, with the same
question held out in "qa" for exact-match accuracy. Caption sources keep their captions, and
training asks "describe the image." for them (an image with several captions gives one training
sample per caption: see data.VLMDataset).
"""
import argparse
import csv
import io
import json
import os
import random
import re
import sys
from collections import Counter
from functools import partial
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw

from data import IMAGE_EXTS, DatasetWriter, VLMDataset, fit, to_rgb

IMAGE_TOKEN = '<image>'
CLASS_QUESTION = 'what is in the image?'

# -----------------------------------------------------------------------------
# shapes: 1 to 3 objects on a 3x3 grid, exactly one of them large.

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
COLORS = {  # name -> RGB; far apart so that +-15 jitter never crosses over
    'red': (220, 45, 45), 'green': (45, 185, 65), 'blue': (55, 85, 230),
    'yellow': (235, 215, 50), 'purple': (160, 65, 210), 'cyan': (45, 200, 215),
}
POSITIONS = ('top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom', 'bottom right')
NUMBERS = ('zero', 'one', 'two', 'three')
QUESTION_TYPES = ('count', 'color', 'shape', 'position', 'exist')
SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges


def sample_scene(rng, image_size=64, object_scale=1.0):
    """A scene: a list of objects {shape, color, size, cell, cx, cy, r, angle} in pixels. object_scale shrinks
    the objects within their cells (the fine-detail task: small objects on a large canvas)."""
    n = int(rng.integers(1, 4))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())  # reading order
    large = int(rng.integers(n))
    cell_px = image_size / 3
    objects = []
    for i, cell in enumerate(cells):
        size = 'large' if i == large else 'small'
        r = cell_px * (0.40 if size == 'large' else 0.28) * rng.uniform(0.9, 1.1) * object_scale  # radius
        slack = cell_px / 2 - r - 0.5  # keep the object inside its cell
        cx = (cell % 3 + 0.5) * cell_px + rng.uniform(-slack, slack)
        cy = (cell // 3 + 0.5) * cell_px + rng.uniform(-slack, slack)
        objects.append(dict(shape=SHAPES[rng.integers(len(SHAPES))],
                            color=list(COLORS)[rng.integers(len(COLORS))],
                            size=size, cell=cell, cx=float(cx), cy=float(cy), r=float(r),
                            angle=float(rng.uniform(-15, 15))))
    return objects


def _polygon(shape, cx, cy, r, angle):
    if shape == 'square':
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r = r * 0.8
    elif shape == 'triangle':
        pts = [(0, -1), (0.9, 0.75), (-0.9, 0.75)]
    elif shape == 'diamond':
        pts = [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)]
    else:  # cross: a plus sign with arms a third of the width
        a, b = 1 / 3, 1
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    t = np.deg2rad(angle)
    c, s = np.cos(t), np.sin(t)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render_scene(objects, rng, image_size=64, noise=6.0):
    """Draw the scene as a uint8 (H, W, 3) array: jittered background, colors and noise."""
    S = SUPERSAMPLE
    bg = tuple(int(v) for v in rng.integers(25, 65, size=3))
    img = Image.new('RGB', (image_size * S, image_size * S), bg)
    draw = ImageDraw.Draw(img)
    for o in objects:
        rgb = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[o['color']])
        cx, cy, r = o['cx'] * S, o['cy'] * S, o['r'] * S
        if o['shape'] == 'circle':
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        else:
            draw.polygon(_polygon(o['shape'], cx, cy, r, o['angle']), fill=rgb)
    img = img.resize((image_size, image_size), Image.BOX)
    x = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, size=(image_size, image_size, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def describe(o):
    # position first: the model decides where the next object is, then reads what is there
    return f"at the {POSITIONS[o['cell']]} a {o['size']} {o['color']} {o['shape']}"


def scene_caption(objects):
    parts = [describe(o) for o in objects]
    text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
    return text + '.'


def scene_questions(objects, rng):
    """Every unambiguous question about the scene, grouped by type: {type: [(q, a), ...]}."""
    shapes = [o['shape'] for o in objects]
    colors = [o['color'] for o in objects]
    pairs = [(o['color'], o['shape']) for o in objects]
    qs = {t: [] for t in QUESTION_TYPES}
    qs['count'].append(('how many objects are there?', NUMBERS[len(objects)]))
    for c in COLORS:
        qs['count'].append((f'how many {c} objects are there?', NUMBERS[colors.count(c)]))
    for s in SHAPES:
        qs['count'].append((f'how many {s}s are there?', NUMBERS[shapes.count(s)]))
    for o in objects:
        where = POSITIONS[o['cell']]
        qs['color'].append((f'what color is the object at the {where}?', o['color']))
        qs['shape'].append((f'what shape is the object at the {where}?', o['shape']))
        if shapes.count(o['shape']) == 1:  # never ask "the circle" when there are two circles
            qs['color'].append((f"what color is the {o['shape']}?", o['color']))
        if colors.count(o['color']) == 1:
            qs['shape'].append((f"what shape is the {o['color']} object?", o['shape']))
        if pairs.count((o['color'], o['shape'])) == 1:
            qs['position'].append((f"where is the {o['color']} {o['shape']}?", where))
        qs['exist'].append((f"is there a {o['color']} {o['shape']}?", 'yes'))
    # as many "no" as "yes"; half of them hard (sharing a color or a shape with an object)
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs]
    hard = [p for p in absent if p[0] in colors or p[1] in shapes]
    for _ in range(len(objects)):
        pool = hard if (hard and rng.random() < 0.5) else absent
        c, s = pool[rng.integers(len(pool))]
        qs['exist'].append((f'is there a {c} {s}?', 'no'))
    return qs


def pick_questions(qs, n, rng):
    """n questions, cycling over the types in a random order so each type gets its share."""
    types = [t for t in qs if qs[t]]
    rng.shuffle(types)
    pools = {t: [qs[t][i] for i in rng.permutation(len(qs[t]))] for t in types}
    out = []
    while len(out) < n and any(pools.values()):
        for t in types:
            if pools[t] and len(out) < n:
                q, a = pools[t].pop()
                out.append({'q': q, 'a': a, 'type': t})
    return out


def shapes_sample(args):
    """One image and its record. Seeded by (seed, split, index): deterministic and order-free.
    args: (seed, split_id, index, image_size, n_questions[, object_scale])."""
    seed, split_id, index, image_size, n_questions, object_scale = (*args, 1.0)[:6]
    rng = np.random.default_rng([seed, split_id, index])
    objects = sample_scene(rng, image_size, object_scale)
    pixels = render_scene(objects, rng, image_size)
    qa = pick_questions(scene_questions(objects, rng), n_questions, rng)
    caption = scene_caption(objects)
    large = next(o for o in objects if o['size'] == 'large')
    # questions first, the caption last: a question never sees the caption in its context,
    # just as at test time, where each question comes alone with the image
    turns = []
    for x in qa + [{'q': 'describe the image.', 'a': caption}]:
        turns += [{'role': 'user', 'content': x['q']}, {'role': 'assistant', 'content': x['a']}]
    turns[0]['content'] = IMAGE_TOKEN + '\n' + turns[0]['content']
    # captions for stage 1: the scene, then each object alone without its position ('a large red circle.').
    # Whole-scene captions are told apart by positions and colours, so a contrastive batch of them never
    # needs the shapes; among the 60 short ones, a batch holds several that differ only in the shape or size.
    captions = [caption] + [f"a {o['size']} {o['color']} {o['shape']}." for o in objects]
    record = dict(turns=turns, captions=captions, label=SHAPES.index(large['shape']), qa=qa, objects=objects)
    return pixels, record


PAIR_TYPES = ('more', 'same', 'color', 'count')  # --pairs: questions about two scenes


def pair_sample(args):
    """Two scenes and their record (--pairs): questions only both images answer ('which image has more
    objects?', 'is the large shape the same in both images?') and questions about one of them, named by its
    place ('what color is the large object in the second image?'). Half the pairs share the large shape."""
    seed, split_id, index, image_size, n_questions, object_scale = args
    rng = np.random.default_rng([seed, split_id, index, 2])
    scenes = [sample_scene(rng, image_size, object_scale) for _ in range(2)]
    large = [next(o for o in s if o['size'] == 'large') for s in scenes]
    same = bool(rng.random() < 0.5)
    others = [t for t in SHAPES if t != large[0]['shape']]
    large[1]['shape'] = large[0]['shape'] if same else others[rng.integers(len(others))]
    pixels = [render_scene(s, rng, image_size) for s in scenes]
    n = [len(s) for s in scenes]
    qs = {'more': [('which image has more objects?', 'the first' if n[0] > n[1] else 'the second' if n[1] > n[0]
                    else 'neither')],
          'same': [('is the large shape the same in both images?', 'yes' if same else 'no')],
          'color': [(f'what color is the large object in the {w} image?', o['color'])
                    for w, o in zip(('first', 'second'), large)],
          'count': [(f'how many objects are in the {w} image?', NUMBERS[k]) for w, k in zip(('first', 'second'), n)]}
    qa = pick_questions(qs, n_questions, rng)
    turns = []
    for x in qa:
        turns += [{'role': 'user', 'content': x['q']}, {'role': 'assistant', 'content': x['a']}]
    turns[0]['content'] = (IMAGE_TOKEN + '\n') * 2 + turns[0]['content']
    return pixels, dict(turns=turns, label=None, qa=qa, objects=scenes)


def prepare_shapes(a):
    splits = {'train': a.n_train, 'val': a.n_val, 'test': a.n_test}
    per = 2 if a.pairs else 1
    writer = DatasetWriter(a.out_dir, a.image_size, per * sum(splits.values()), list(splits))
    make = pair_sample if a.pairs else shapes_sample
    with Pool(a.workers) as pool:
        for split_id, (split, n) in enumerate(splits.items()):
            q = a.questions_train if split == 'train' else a.questions_eval
            jobs = [(a.seed, split_id, i, a.image_size, q, a.object_scale) for i in range(n)]
            for i, (pixels, record) in enumerate(pool.imap(make, jobs, chunksize=256)):
                writer.add(split, {'id': f'{split}-{i:06d}', **record}, pixels)
            print(f'{split}: {n} images')
    meta = writer.close(source='shapes', image_size=a.image_size, class_names=list(SHAPES), colors=list(COLORS),
                        label_meaning='shape of the large object', skipped={}, seed=a.seed,
                        question_types=list(PAIR_TYPES if a.pairs else QUESTION_TYPES), object_scale=a.object_scale,
                        images_per_sample=per)
    save_examples(a.out_dir, np.load(os.path.join(a.out_dir, 'images.npy'), mmap_mode='r'),
                  os.path.join(a.out_dir, 'test.jsonl'))
    print(f"wrote {a.out_dir}: {json.dumps(meta['counts'])}")


def save_examples(out_dir, images, jsonl, n=4):
    """A few test images as PNG files, with their questions and answers, to try sample.py on."""
    os.makedirs(os.path.join(out_dir, 'examples'), exist_ok=True)
    with open(jsonl) as f, open(os.path.join(out_dir, 'examples', 'answers.txt'), 'w') as out:
        for i, line in zip(range(n), f):
            r = json.loads(line)
            rows = r['image'] if isinstance(r['image'], list) else [r['image']]
            names = [f'example{i}.png'] if len(rows) == 1 else [f'example{i}{c}.png' for c in 'ab'[:len(rows)]]
            for row, name in zip(rows, names):
                Image.fromarray(np.asarray(images[row])).save(os.path.join(out_dir, 'examples', name))
            out.write(f"{' '.join(names)}: {(r.get('captions') or [''])[0]}\n" +
                      ''.join(f"  {x['q']} -> {x['a']}\n" for x in r['qa']))


# -----------------------------------------------------------------------------
# images: any file, any mode -> RGB at the target size (data.to_rgb, data.fit), decoded on all cores

_hf_parts = None  # {split: datasets.Dataset} in each worker of the hf source


def _set_hf_parts(parts):
    global _hf_parts
    _hf_parts = parts


def load_image(job, size, resize, fmt):
    """job = (where, src), src a path, encoded bytes, a uint8 (H, W, 3) array or (split, row, column)
    of the hf source's dataset. Returns (pixels (size, size, 3) uint8 or encoded bytes, None), or
    (None, 'where: why') when unreadable."""
    where, src = job
    if isinstance(src, tuple):
        split, i, column = src
        cell = _hf_parts[split][i][column] or {}
        src = cell.get('bytes') or cell.get('path')
    if src is None:
        return None, f'{where}: missing'
    try:
        if isinstance(src, np.ndarray):
            img = Image.fromarray(src)
        else:
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
            img.load()  # decode now, so a truncated file fails here and not in training
        img = fit(to_rgb(img), size, resize)
    except FileNotFoundError:
        return None, f'{where}: missing'
    except Exception as e:  # PIL raises many types for bad files; a bad image is skipped, never fatal
        return None, f'{where}: corrupt ({type(e).__name__}: {e})'
    if fmt == 'raw':
        return np.asarray(img, dtype=np.uint8), None
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95)
    return buf.getvalue(), None


# -----------------------------------------------------------------------------
# writing: samples -> the on-disk format (data.DatasetWriter)

def write_dataset(a, source, splits, class_names, skipped, bad=(), hf_parts=None, **extra):
    """splits: {split: [(where, image source, record)]}. Images are decoded and resized on all cores;
    one that cannot be read is reported, skipped and counted; the rest get consecutive rows."""
    from tqdm import tqdm
    fmt = a.shard_format.upper().replace('JPG', 'JPEG') if a.shards else 'raw'
    total = sum(len(src) if isinstance(src, list) else 1 for v in splits.values() for _, src, _ in v)  # images
    writer = DatasetWriter(a.out_dir, a.image_size, total, list(splits), fmt if a.shards else None)
    skipped, bad = Counter(skipped), list(bad)
    work = partial(load_image, size=a.image_size, resize=a.resize, fmt=fmt)
    chunk = max(1, min(256, total // (8 * a.workers) or 1))
    with Pool(a.workers, _set_hf_parts, (hf_parts,)) as pool, tqdm(total=total, desc=source, unit='img', disable=total < 2) as bar:
        for split, items in splits.items():
            # a sample about several images has a list of sources: each is a job, and the sample is written
            # with all of its images or, if one cannot be read, skipped with that one's error
            jobs = ((where, one) for where, src, _ in items for one in (src if isinstance(src, list) else [src]))
            results = pool.imap(work, jobs, chunksize=chunk)
            for where, src, record in items:
                got = [next(results) for _ in (src if isinstance(src, list) else [src])]
                bar.update()
                error = next((e for _, e in got if e), None)
                if error:
                    skipped['missing_image' if error.endswith(': missing') else 'corrupt_image'] += 1
                    bad.append(error)
                    continue
                writer.add(split, record, [p for p, _ in got] if isinstance(src, list) else got[0][0])
    meta = writer.close(bad, source=source, image_size=a.image_size, resize=a.resize, class_names=class_names,
                        skipped=dict(skipped), **extra)
    for b in bad[:10]:
        print(f'skipped {b}', file=sys.stderr)
    if len(bad) > 10:
        print(f'... and {len(bad) - 10} more, all listed in {a.out_dir}/skipped.txt', file=sys.stderr)
    print(f"wrote {a.out_dir}: {json.dumps(meta['counts'])}")


def bad_row(skipped, bad, where, why):
    """A malformed row of a CSV or JSON file: reported by line, skipped and counted."""
    skipped['bad_row'] += 1
    bad.append(f'{where}: {why}')


def split_items(items, a):
    """A seeded split into train/val/test by --val_fraction and --test_fraction (of images)."""
    order = list(range(len(items)))
    random.Random(a.seed).shuffle(order)
    n_val, n_test = round(len(items) * a.val_fraction), round(len(items) * a.test_fraction)
    pick = lambda idx: [items[i] for i in sorted(idx)]
    return {'train': pick(order[n_val + n_test:]), 'val': pick(order[:n_val]), 'test': pick(order[n_val:n_val + n_test])}


def readable(name):
    return str(name).replace('_', ' ').strip()


def classified(id, label, class_names, captions=None, n_images=1):
    """A record for a labelled image (or n_images images together): the class question as the conversation and
    a held-out question; captions templated from the label unless given."""
    name = readable(class_names[label])
    return {'id': id, 'turns': [{'role': 'user', 'content': f'{IMAGE_TOKEN}\n' * n_images + CLASS_QUESTION},
                                {'role': 'assistant', 'content': name}],
            'captions': captions or [f'a photo of a {name}.'], 'label': label,
            'qa': [{'q': CLASS_QUESTION, 'a': name, 'type': 'class'}]}


def captioned(id, captions, label=None):
    return {'id': id, 'turns': [], 'captions': captions, 'label': label, 'qa': []}


def read_csv_rows(path, required):
    """(line number, row dict) of a CSV file whose header has the required columns."""
    if not os.path.exists(path):
        raise SystemExit(f'data error: {path} not found')
    f = open(path, newline='', encoding='utf-8-sig')
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise SystemExit(f'data error: {path} has no column {missing[0]!r} (columns: {reader.fieldnames}); '
                         f'name the right one with a flag')
    for row in reader:
        yield reader.line_num, row
    f.close()


def json_entries(path):
    """(line number, entry) of a JSON array (one parse, entry by entry, so each entry knows its
    line) or of a JSON-lines file. A syntax error is fatal and names the line."""
    text = open(path, encoding='utf-8').read()
    dec, space = json.JSONDecoder(), re.compile(r'\s*')
    ws = lambda i: space.match(text, i).end()
    seen = [0, 1]  # (position, its line): counted forward, entry by entry

    def lineno(pos):
        seen[1] += text.count('\n', seen[0], pos)
        seen[0] = pos
        return seen[1]

    i = ws(0)
    try:
        if text[i:i + 1] != '[':  # JSON lines
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield n, e  # one bad line of many: the caller skips and counts it
            return
        i = ws(i + 1)
        while text[i:i + 1] != ']':
            obj, j = dec.raw_decode(text, i)
            yield lineno(i), obj
            i = ws(j)
            if text[i:i + 1] == ',':
                i = ws(i + 1)
            elif text[i:i + 1] != ']':
                raise json.JSONDecodeError("expected ',' or ']'", text, i)
    except json.JSONDecodeError as e:
        raise SystemExit(f'data error: {path} line {e.lineno} is not valid JSON ({e.msg}); fix or remove that entry')


# -----------------------------------------------------------------------------
# sources

def prepare_cifar10(a):
    """The official python batches: data_batch_1..5 (train, and --val_fraction of it for val) and
    test_batch (test). Each batch is a pickled dict: b'data' uint8 (10000, 3072) as R, G, B planes
    of 32x32, b'labels', b'filenames'; batches.meta has the label names."""
    import pickle

    def unpickle(name):
        path = os.path.join(a.root, name)
        if not os.path.exists(path):
            raise SystemExit(f'data error: {path} not found; --root must be the extracted cifar-10-batches-py folder')
        with open(path, 'rb') as f:
            return pickle.load(f, encoding='bytes')

    class_names = [n.decode() for n in unpickle('batches.meta')[b'label_names']]

    def batches(names):
        data = [unpickle(n) for n in names]
        pixels = np.concatenate([d[b'data'] for d in data]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return pixels, [int(l) for d in data for l in d[b'labels']], [f.decode() for d in data for f in d[b'filenames']]

    train_px, train_y, train_names = batches([f'data_batch_{i}' for i in range(1, 6)])
    test_px, test_y, test_names = batches(['test_batch'])
    skipped, bad, descriptions = Counter(), [], {}
    if a.descriptions:  # Dataset_Index is the row of the 50,000 training images, in batch order
        cols = [f'A{k}' for k in range(1, 6)]
        for line, row in read_csv_rows(a.descriptions, ['Dataset_Index'] + cols):
            try:
                index = int(row['Dataset_Index'])
                texts = [row[c].strip() for c in cols if row.get(c) and row[c].strip()]
                if not 0 <= index < len(train_y):
                    raise ValueError(f'Dataset_Index {index} is not a training image (0..{len(train_y) - 1})')
                if not texts:
                    raise ValueError('no text in A1..A5')
            except (ValueError, AttributeError) as e:
                bad_row(skipped, bad, f'{a.descriptions} line {line}', e)
                continue
            descriptions[index] = texts
    train = []
    for i, (px, y) in enumerate(zip(train_px, train_y)):
        if a.descriptions:
            if i not in descriptions:
                skipped['no_description'] += 1
                continue
            rec = captioned(f'train-{i:05d}', descriptions[i], y)
        else:
            rec = classified(f'train-{i:05d}', y, class_names)
        train.append((f'data_batch {train_names[i]}', px, rec))
    n_val = round(len(train) * a.val_fraction)
    splits = {'train': train[:len(train) - n_val], 'val': train[len(train) - n_val:],
              'test': [(f'test_batch {n}', px, classified(f'test-{i:05d}', y, class_names))
                       for i, (px, y, n) in enumerate(zip(test_px, test_y, test_names))]}
    write_dataset(a, 'cifar10', splits, class_names, skipped, bad, descriptions=a.descriptions or None)


def need_folder(path, flag):
    if not os.path.isdir(path):
        raise SystemExit(f'data error: {path} is not a folder; {flag} must be the folder the images are in')


def prepare_coco(a):
    """A COCO captions file {"images": [{id, file_name}], "annotations": [{image_id, caption}]}:
    one sample per image with all its captions."""
    need_folder(a.images, '--images')
    entries = load_json_object(a.annotations)
    skipped, bad, captions = Counter(), [], {}
    for k, ann in enumerate(entries.get('annotations', [])):
        if not isinstance(ann, dict) or not isinstance(ann.get('caption'), str) or 'image_id' not in ann:
            bad_row(skipped, bad, f'{a.annotations} annotations[{k}]', "needs 'image_id' and a string 'caption'")
            continue
        captions.setdefault(ann['image_id'], []).append(' '.join(ann['caption'].split()))
    items = []
    for k, im in enumerate(entries.get('images', [])):
        if not isinstance(im, dict) or 'id' not in im or 'file_name' not in im:
            bad_row(skipped, bad, f'{a.annotations} images[{k}]', "needs 'id' and 'file_name'")
            continue
        if im['id'] not in captions:
            skipped['no_caption'] += 1
            continue
        path = os.path.join(a.images, im['file_name'])
        items.append((path, path, captioned(str(im['id']), captions[im['id']])))
    write_dataset(a, 'coco', split_items(items, a), None, skipped, bad)


def load_json_object(path):
    """A JSON object file (COCO), with the line of a syntax error."""
    if not os.path.exists(path):
        raise SystemExit(f'data error: {path} not found')
    try:
        with open(path, encoding='utf-8') as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f'data error: {path} line {e.lineno} is not valid JSON ({e.msg})')
    if not isinstance(obj, dict):
        raise SystemExit(f'data error: {path} is not a COCO annotation object ({{"images": ..., "annotations": ...}})')
    return obj


LLAVA_ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant'}


def llava_turns(conversations, n_images=1):
    """LLaVA conversations -> glimpse turns: alternating user/assistant, the image placeholder moved
    to the start of the first user turn (LLaVA puts it first or last), a trailing question dropped.
    Several images (LLaVA-OneVision's "image": [...]): one '<image>' each, kept where they stand (or, if the
    text has none, all at the start of the first user turn)."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("no 'conversations' list")
    turns = []
    for k, c in enumerate(conversations):
        role = LLAVA_ROLES.get(c.get('from')) if isinstance(c, dict) else None
        if role is None or not isinstance(c.get('value'), str):
            raise ValueError(f"conversations[{k}] needs 'from' (human/gpt) and a string 'value'")
        if role != ('user', 'assistant')[k % 2]:
            raise ValueError(f'conversations[{k}] is {c["from"]!r}: turns must alternate human, gpt, ...')
        turns.append({'role': role, 'content': c['value'].strip() if n_images > 1 else
                      c['value'].replace(IMAGE_TOKEN, '').strip()})
    if turns[-1]['role'] == 'user':
        turns = turns[:-1]
    if not turns:
        raise ValueError('no answer')
    marks = sum(t['content'].count(IMAGE_TOKEN) for t in turns)
    if n_images == 1 or not marks:
        turns[0]['content'] = f"{IMAGE_TOKEN}\n" * n_images + turns[0]['content']
    elif marks != n_images:
        raise ValueError(f"{n_images} images but {marks} '{IMAGE_TOKEN}' placeholders in the answered turns")
    return turns


def prepare_llava(a):
    """LLaVA JSON (a list, or JSON lines) of {id, image, conversations: [{from, value}]}; "image" is one path
    or, as in LLaVA-OneVision's interleaved data, a list of them. Text-only entries (no image) are counted in
    meta.json, not trained on: every glimpse sample has an image."""
    need_folder(a.images, '--images')
    if not os.path.exists(a.json):
        raise SystemExit(f'data error: {a.json} not found')
    skipped, bad, items = Counter(), [], []
    for line, e in json_entries(a.json):
        where = f'{a.json} line {line}'
        if not isinstance(e, dict):
            bad_row(skipped, bad, where, f'not valid JSON ({e.msg})' if isinstance(e, ValueError) else 'not an object')
            continue
        if not e.get('image'):
            skipped['text_only'] += 1
            continue
        several = isinstance(e['image'], list)
        names = e['image'] if several else [e['image']]
        if not all(isinstance(n, str) and n for n in names):
            bad_row(skipped, bad, where, "'image' must be a path or a list of paths")
            continue
        try:
            turns = llava_turns(e.get('conversations'), len(names))
        except (ValueError, AttributeError) as err:
            bad_row(skipped, bad, where, err)
            continue
        paths = [os.path.join(a.images, n) for n in names]
        items.append((paths[0], paths if several else paths[0],
                      {'id': str(e.get('id', line)), 'turns': turns, 'captions': [], 'label': None, 'qa': []}))
    write_dataset(a, 'llava', split_items(items, a), None, skipped, bad)


def prepare_imagefolder(a):
    """root/<class>/<image>: the class names are the sorted folder names."""
    if not os.path.isdir(a.root):
        raise SystemExit(f'data error: {a.root} is not a folder; give a folder with one sub-folder per class')
    class_names = sorted(d for d in os.listdir(a.root) if os.path.isdir(os.path.join(a.root, d)))
    if not class_names:
        raise SystemExit(f'data error: {a.root} has no class sub-folders')
    items = []
    for y, name in enumerate(class_names):
        for fn in sorted(os.listdir(os.path.join(a.root, name))):
            if fn.lower().endswith(IMAGE_EXTS):
                path = os.path.join(a.root, name, fn)
                items.append((path, path, classified(f'{name}/{fn}', y, class_names)))
    write_dataset(a, 'imagefolder', split_items(items, a), class_names, Counter())


def prepare_csv(a):
    """A CSV with an image-path column (relative to --images, default the CSV's folder), text
    columns (captions) and/or a label column."""
    texts = [c for c in a.text_columns.split(',') if c]
    if not texts and not a.label_column:
        raise SystemExit('usage: name --text_columns and/or --label_column')
    base = a.images or os.path.dirname(os.path.abspath(a.csv))
    if not os.path.exists(a.csv):
        raise SystemExit(f'data error: {a.csv} not found')
    image_columns = [c for c in a.image_column.split(',') if c]  # several: one sample about all of them
    rows = list(read_csv_rows(a.csv, image_columns + texts + ([a.label_column] if a.label_column else [])))
    class_names = None
    if a.label_column:
        values = {r[a.label_column].strip() for _, r in rows if r.get(a.label_column, '').strip()}
        class_names = sorted(values, key=lambda v: (int(v), v) if v.lstrip('-').isdigit() else (float('inf'), v))
    skipped, bad, items = Counter(), [], []
    for line, r in rows:
        where = f'{a.csv} line {line}'
        paths = [(r.get(c) or '').strip() for c in image_columns]
        caps = [r[c].strip() for c in texts if r.get(c) and r[c].strip()]
        label = (r.get(a.label_column) or '').strip() if a.label_column else None
        empty = next((c for c, p in zip(image_columns, paths) if not p), None)
        if empty or (not caps and not label):
            bad_row(skipped, bad, where, f'empty {empty!r}' if empty else 'no text in ' + ', '.join(texts))
            continue
        y = class_names.index(label) if label else None
        rec = captioned(f'line{line}', caps, y) if caps else classified(f'line{line}', y, class_names, n_images=len(paths))
        full = [os.path.join(base, p) for p in paths]
        items.append((full[0], full if len(full) > 1 else full[0], rec))
    write_dataset(a, 'csv', split_items(items, a), class_names, skipped, bad)


def prepare_hf(a):
    """A Hugging Face datasets-library dataset, by hub id or a save_to_disk folder. The image and
    label columns and the class names come from its features unless named by flags."""
    try:
        import datasets
    except ImportError:
        raise SystemExit('the hf source needs the datasets library: pip install datasets')
    try:
        if os.path.isdir(a.dataset):
            ds = datasets.load_from_disk(a.dataset)
        else:
            ds = datasets.load_dataset(a.dataset, a.config or None)
    except Exception as e:  # offline, unknown id, no permission: the library's messages run to pages
        first = (str(e).strip().splitlines() or [''])[0][:200]
        raise SystemExit(f'data error: cannot load dataset {a.dataset!r} ({type(e).__name__}: {first}); '
                         f'check the id, or on a connected machine save it once with datasets.load_dataset('
                         f'{a.dataset!r}).save_to_disk(<dir>) and give that folder as --dataset')
    parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {'train': ds}
    features = next(iter(parts.values())).features
    image_col = a.image_column or next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    label_col = a.label_column or next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    for flag, col in (('--image_column', image_col), ('--label_column', label_col)):
        if col is not None and col not in features:
            raise SystemExit(f'data error: {a.dataset} has no column {col!r} (columns: {list(features)}); fix {flag}')
    if image_col is None:
        raise SystemExit(f'data error: no Image column in {a.dataset} (columns: {list(features)}); name it with --image_column')
    if label_col is None and not a.text_column:
        raise SystemExit(f'data error: no ClassLabel column in {a.dataset} (columns: {list(features)}); '
                         f'name one with --label_column or a caption column with --text_column')
    feature = features.get(label_col)
    class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if label_col and class_names is None:  # a plain column of labels: its sorted values are the classes
        class_names = sorted({str(v) for p in parts.values() for v in p[label_col]})
    plain_labels = class_names
    if a.class_names:  # e.g. readable names for a ClassLabel of codes
        names = [n.strip() for n in a.class_names.split(',')]
        if class_names is not None and len(names) != len(class_names):
            raise SystemExit(f'--class_names has {len(names)} names but {a.dataset} has {len(class_names)} classes: {class_names}')
        class_names = names
    aliases = {'train': 'train', 'validation': 'val', 'valid': 'val', 'val': 'val', 'test': 'test'}
    items = {}
    # the workers read and decode the images from the (memory-mapped) dataset; here only the rest is read
    parts = {split: part.cast_column(image_col, datasets.Image(decode=False)) for split, part in parts.items()}
    for split, part in parts.items():
        rows = []
        for i, ex in enumerate(part.remove_columns(image_col)):
            src = (split, i, image_col)
            y = ex[label_col] if label_col else None
            if y is not None and not isinstance(feature, datasets.ClassLabel):
                y = plain_labels.index(str(y))
            caps = [ex[a.text_column]] if a.text_column and ex.get(a.text_column) else None
            rec = classified(f'{split}-{i}', y, class_names, caps) if y is not None and not a.text_column \
                else captioned(f'{split}-{i}', caps or [], y)
            rows.append((f'{a.dataset} {split}[{i}]', src, rec))
        items[aliases.get(split, split)] = rows
    if set(items) - {'train', 'val', 'test'} or 'train' not in items:
        raise SystemExit(f'data error: {a.dataset} has splits {list(parts)}; glimpse needs train (and optionally validation, test)')
    if 'val' not in items or 'test' not in items:  # carve what is missing out of train
        rest = split_items(items['train'], argparse.Namespace(
            seed=a.seed, val_fraction=0 if 'val' in items else a.val_fraction,
            test_fraction=0 if 'test' in items else a.test_fraction))
        items = {'train': rest['train'], 'val': items.get('val', rest['val']), 'test': items.get('test', rest['test'])}
    write_dataset(a, 'hf', items, class_names, Counter(), hf_parts=parts, dataset=a.dataset, image_column=image_col,
                  label_column=label_col)


# -----------------------------------------------------------------------------
# --inspect: what the model will see

def length_stats(lengths):
    if not lengths:
        return 'none'
    x = np.array(lengths)
    return f'{len(x)} texts, words min {x.min()} / median {int(np.median(x))} / mean {x.mean():.1f} / max {x.max()}'


def inspect(data_dir, n_show=3, n_sheet=16, cell=128):
    """Counts, caption and answer lengths, a few samples; contact_sheet.png of images and texts."""
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        raise SystemExit(f'data error: {data_dir}/meta.json not found; prepare the data first (python prepare_data.py --help)')
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    print(f"{data_dir}: source {meta['source']}, {meta['image_size']}px, storage {meta.get('storage', 'npy')}")
    print(f"counts {meta['counts']}, skipped {meta.get('skipped', {})}")
    if meta.get('class_names'):
        print(f"{len(meta['class_names'])} classes: {', '.join(map(str, meta['class_names'][:20]))}"
              + (' ...' if len(meta['class_names']) > 20 else ''))
    sheet_items = []
    for split in ('train', 'val', 'test'):
        if not os.path.exists(os.path.join(data_dir, f'{split}.jsonl')):
            continue
        ds = VLMDataset(data_dir, split, expand_captions=False)
        recs = ds.records
        caps = [len(c.split()) for r in recs for c in r.get('captions', [])]
        answers = [len(t['content'].split()) for r in recs for t in r.get('turns', []) if t['role'] == 'assistant']
        n_turns = [sum(t['role'] == 'assistant' for t in r.get('turns', [])) for r in recs]
        labels = Counter(r['label'] for r in recs if r.get('label') is not None)
        print(f'\n{split}: {len(recs)} samples, {min(n_turns, default=0)} to {max(n_turns, default=0)} answers each')
        print(f'  captions: {length_stats(caps)}')
        print(f'  answers:  {length_stats(answers)}')
        if labels:
            print(f'  labels: {len(labels)} classes, {min(labels.values())} to {max(labels.values())} samples each')
        for r in recs[:n_show]:
            print(f"  [{r['id']}] image {r['image']}, label {r.get('label')}")
            for t in r.get('turns', [])[:4]:
                print(f"    {t['role']}: {t['content'][:100]!r}")
            for c in r.get('captions', [])[:2]:
                print(f'    caption: {c[:100]!r}')
        if split == 'train':
            sheet_items = [(ds.images[r['image']], r) for r in recs[:n_sheet]]
    path = os.path.join(data_dir, 'contact_sheet.png')
    contact_sheet(sheet_items, path, cell)
    print(f'\nwrote {path}')


def contact_sheet(items, path, cell=128, cols=4, text_h=48):
    """A grid of images, each upscaled to cell x cell, with its first text underneath."""
    from textwrap import wrap
    rows = max(1, -(-len(items) // cols))
    sheet = Image.new('RGB', (cols * cell, rows * (cell + text_h)), 'white')
    draw = ImageDraw.Draw(sheet)
    for k, (pixels, r) in enumerate(items):
        x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
        sheet.paste(Image.fromarray(np.asarray(pixels)).resize((cell, cell), Image.NEAREST), (x, y))
        answers = [t['content'] for t in r.get('turns', []) if t['role'] == 'assistant']
        text = (r.get('captions') or answers or [''])[0]
        draw.multiline_text((x + 2, y + cell + 2), '\n'.join(wrap(text, 22)[:3]), fill='black')
    sheet.save(path)


# -----------------------------------------------------------------------------

def main(argv=None):
    if argv and argv[0] == '--inspect':
        if len(argv) != 2:
            raise SystemExit('usage: python prepare_data.py --inspect data/<name>')
        return inspect(argv[1])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='source', required=True)
    s = sub.add_parser('shapes', help='synthetic shapes scenes (no download)')
    s.add_argument('--out_dir', default='data/shapes')
    s.add_argument('--n_train', type=int, default=50000)
    s.add_argument('--n_val', type=int, default=500)
    s.add_argument('--n_test', type=int, default=1000)
    s.add_argument('--image_size', type=int, default=64)
    s.add_argument('--questions_train', type=int, default=6, help='questions per training image')
    s.add_argument('--questions_eval', type=int, default=5, help='questions per val/test image')
    s.add_argument('--object_scale', type=float, default=1.0,
                   help='object size within its cell (the fine-detail task: --image_size 216 --object_scale 0.5)')
    s.add_argument('--pairs', action='store_true', help='two scenes a sample, with questions comparing them')
    s.add_argument('--seed', type=int, default=1337)
    s.add_argument('--workers', type=int, default=os.cpu_count())

    common = argparse.ArgumentParser(add_help=False)  # the flags every real source shares
    common.add_argument('--out_dir', help='default: data/<source>')
    common.add_argument('--image_size', type=int, help='square side in pixels (default 224; cifar10: 32)')
    common.add_argument('--resize', choices=('crop', 'pad'), default='crop',
                        help='crop: center square of the short side; pad: whole image on black')
    common.add_argument('--val_fraction', type=float, default=0.05)
    common.add_argument('--test_fraction', type=float, default=0.05, help='(cifar10: its test_batch instead)')
    common.add_argument('--shards', action='store_true', help='encoded images in shard files, not raw pixels')
    common.add_argument('--shard_format', choices=('png', 'jpeg'), default='jpeg', help='with --shards (jpeg at quality 95)')
    common.add_argument('--seed', type=int, default=1337, help='for the split')
    common.add_argument('--workers', type=int, default=os.cpu_count())
    s = sub.add_parser('cifar10', parents=[common], help='the official cifar-10-batches-py folder')
    s.add_argument('--root', default='cifar-10-batches-py')
    s.add_argument('--descriptions', default='', help='CSV Dataset_Index,A1..A5: texts for training images (index 0..49999)')
    s = sub.add_parser('coco', parents=[common], help='COCO captions: annotation JSON + image folder')
    s.add_argument('--annotations', required=True)
    s.add_argument('--images', required=True)
    s = sub.add_parser('llava', parents=[common], help='LLaVA conversations JSON + image folder')
    s.add_argument('--json', required=True)
    s.add_argument('--images', required=True)
    s = sub.add_parser('imagefolder', parents=[common], help='one sub-folder of images per class')
    s.add_argument('--root', required=True)
    s = sub.add_parser('csv', parents=[common], help='a CSV of image paths and texts and/or labels')
    s.add_argument('--csv', required=True)
    s.add_argument('--images', default='', help='folder the image paths are relative to (default: the CSV\'s)')
    s.add_argument('--image_column', default='image', help='comma-separated for several images a sample')
    s.add_argument('--text_columns', default='', help='comma-separated caption columns')
    s.add_argument('--label_column', default='')
    s = sub.add_parser('hf', parents=[common], help='a Hugging Face datasets-library dataset (pip install datasets)')
    s.add_argument('--dataset', required=True, help='hub id or a save_to_disk folder')
    s.add_argument('--config', default='', help='the dataset configuration name, if it has several')
    s.add_argument('--image_column', default='', help='default: the first Image feature')
    s.add_argument('--label_column', default='', help='default: the first ClassLabel feature')
    s.add_argument('--text_column', default='', help='a caption column, instead of the class question')
    s.add_argument('--class_names', default='', help='comma-separated, in label order (default: from the features)')
    a = p.parse_args(argv)
    if a.source == 'shapes':
        return prepare_shapes(a)
    if a.image_size is None:  # given in either form (--image_size 64, --image_size=64), it is kept
        a.image_size = 32 if a.source == 'cifar10' else 224
    a.out_dir = a.out_dir or os.path.join('data', a.source)
    for name in ('val_fraction', 'test_fraction'):
        if not 0 <= getattr(a, name) < 1:
            raise SystemExit(f'--{name} must be in [0, 1)')
    {'cifar10': prepare_cifar10, 'coco': prepare_coco, 'llava': prepare_llava, 'imagefolder': prepare_imagefolder,
     'csv': prepare_csv, 'hf': prepare_hf}[a.source](a)


if __name__ == '__main__':
    main(sys.argv[1:])
