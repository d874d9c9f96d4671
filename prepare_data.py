"""
Turn a source into glimpse's one on-disk format:

    data/<name>/images.npy     uint8 (N, H, W, 3), memory-mapped at training time
    data/<name>/{train,val,test}.jsonl
                               one sample per line:
                               {"id", "image": row in images.npy, "turns": [{"role", "content"}],
                                "captions": [...], "label": int or null, "qa": [{"q", "a", "type"}]}
                               the first user turn holds the image placeholder "<image>".
    data/<name>/meta.json      source, image size, class names, counts, what was skipped

Sources:
    python prepare_data.py shapes [--n_train 50000 ...]   synthetic scenes, no download (the default)
"""
import argparse
import json
import os
import sys
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw

IMAGE_TOKEN = '<image>'

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


def sample_scene(rng, image_size=64):
    """A scene: a list of objects {shape, color, size, cell, cx, cy, r, angle} in pixels."""
    n = int(rng.integers(1, 4))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())  # reading order
    large = int(rng.integers(n))
    cell_px = image_size / 3
    objects = []
    for i, cell in enumerate(cells):
        size = 'large' if i == large else 'small'
        r = cell_px * (0.40 if size == 'large' else 0.28) * rng.uniform(0.9, 1.1)  # radius
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
    types = [t for t in QUESTION_TYPES if qs[t]]
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
    """One image and its record. Seeded by (seed, split, index): deterministic and order-free."""
    seed, split_id, index, image_size, n_questions = args
    rng = np.random.default_rng([seed, split_id, index])
    objects = sample_scene(rng, image_size)
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
    record = dict(turns=turns, captions=[caption], label=SHAPES.index(large['shape']), qa=qa, objects=objects)
    return pixels, record


def prepare_shapes(a):
    splits = {'train': a.n_train, 'val': a.n_val, 'test': a.n_test}
    os.makedirs(a.out_dir, exist_ok=True)
    total = sum(splits.values())
    images = np.lib.format.open_memmap(os.path.join(a.out_dir, 'images.npy.tmp'), mode='w+', dtype=np.uint8,
                                       shape=(total, a.image_size, a.image_size, 3))
    row = 0
    with Pool(a.workers) as pool:
        for split_id, (split, n) in enumerate(splits.items()):
            q = a.questions_train if split == 'train' else a.questions_eval
            jobs = [(a.seed, split_id, i, a.image_size, q) for i in range(n)]
            with open(os.path.join(a.out_dir, f'{split}.jsonl'), 'w') as f:
                for i, (pixels, record) in enumerate(pool.imap(shapes_sample, jobs, chunksize=256)):
                    images[row] = pixels
                    f.write(json.dumps({'id': f'{split}-{i:06d}', 'image': row, **record}) + '\n')
                    row += 1
            print(f'{split}: {n} images')
    images.flush()
    save_examples(a.out_dir, images, os.path.join(a.out_dir, 'test.jsonl'))
    del images
    os.replace(os.path.join(a.out_dir, 'images.npy.tmp'), os.path.join(a.out_dir, 'images.npy'))
    write_meta(a.out_dir, source='shapes', image_size=a.image_size, class_names=list(SHAPES),
               label_meaning='shape of the large object', counts=splits, skipped={},
               question_types=list(QUESTION_TYPES), seed=a.seed)


def save_examples(out_dir, images, jsonl, n=4):
    """A few test images as PNG files, with their questions and answers, to try sample.py on."""
    os.makedirs(os.path.join(out_dir, 'examples'), exist_ok=True)
    with open(jsonl) as f, open(os.path.join(out_dir, 'examples', 'answers.txt'), 'w') as out:
        for i, line in zip(range(n), f):
            r = json.loads(line)
            name = f'example{i}.png'
            Image.fromarray(np.asarray(images[r['image']])).save(os.path.join(out_dir, 'examples', name))
            out.write(f"{name}: {r['captions'][0]}\n" + ''.join(f"  {x['q']} -> {x['a']}\n" for x in r['qa']))


def write_meta(out_dir, **meta):
    with open(os.path.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)
    print(f"wrote {out_dir}: {json.dumps(meta['counts'])}")


def main(argv=None):
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
    s.add_argument('--seed', type=int, default=1337)
    s.add_argument('--workers', type=int, default=os.cpu_count())
    a = p.parse_args(argv)
    if a.source == 'shapes':
        prepare_shapes(a)


if __name__ == '__main__':
    main(sys.argv[1:])
