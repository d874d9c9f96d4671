import json
import os
import re

import numpy as np

from prepare_data import COLORS, NUMBERS, POSITIONS, QUESTION_TYPES, SHAPES, shapes_sample

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)


def object_pixels(img):
    """Mask of pixels far from the background (the image's median color)."""
    bg = np.median(img.reshape(-1, 3), axis=0)
    return np.abs(img.astype(np.float32) - bg).sum(-1) > 90


def cell_slice(cell, size=64):
    """Rows and columns of one cell of the 3x3 grid."""
    r, c = divmod(cell, 3)
    top, left = int(r * size / 3), int(c * size / 3)
    return slice(top, top + size // 3), slice(left, left + size // 3)


def color_in_cell(img, cell):
    rows, cols = cell_slice(cell)
    patch = img[rows, cols].astype(np.float32)
    mask = object_pixels(img)[rows, cols]
    mean = patch[mask].mean(0)
    return list(COLORS)[np.argmin(((PALETTE - mean) ** 2).sum(-1))]


def scenes(n=150, seed=7):
    return [shapes_sample((seed, 0, i, 64, 50)) for i in range(n)]


def test_deterministic_by_seed():
    a, b = shapes_sample((1, 0, 5, 64, 10)), shapes_sample((1, 0, 5, 64, 10))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    c = shapes_sample((2, 0, 5, 64, 10))
    assert not np.array_equal(a[0], c[0])


def test_answers_are_true_to_the_pixels():
    checked = {'count': 0, 'color': 0}
    for img, rec in scenes():
        occupied = [cell for cell in range(9) if object_pixels(img)[cell_slice(cell)].sum() > 8]
        for x in rec['qa']:
            if x['q'] == 'how many objects are there?':
                assert x['a'] == NUMBERS[len(occupied)], (x, occupied)
                checked['count'] += 1
            m = re.fullmatch(r'what color is the object at the (.+)\?', x['q'])
            if m:
                assert color_in_cell(img, POSITIONS.index(m.group(1))) == x['a'], x
                checked['color'] += 1
    assert checked['count'] > 20 and checked['color'] > 100


def test_questions_are_unambiguous_and_answers_consistent():
    seen_types = set()
    for img, rec in scenes():
        objs = rec['objects']
        assert 1 <= len(objs) <= 3 and sum(o['size'] == 'large' for o in objs) == 1
        assert rec['label'] == SHAPES.index(next(o['shape'] for o in objs if o['size'] == 'large'))
        for x in rec['qa']:
            seen_types.add(x['type'])
            q, a = x['q'], x['a']
            if m := re.fullmatch(r'what color is the (\w+)\?', q):
                hits = [o for o in objs if o['shape'] == m.group(1)]
                assert len(hits) == 1 and hits[0]['color'] == a, x
            if m := re.fullmatch(r'what shape is the (\w+) object\?', q):
                hits = [o for o in objs if o['color'] == m.group(1)]
                assert len(hits) == 1 and hits[0]['shape'] == a, x
            if m := re.fullmatch(r'where is the (\w+) (\w+)\?', q):
                hits = [o for o in objs if (o['color'], o['shape']) == m.groups()]
                assert len(hits) == 1 and POSITIONS[hits[0]['cell']] == a, x
            if m := re.fullmatch(r'is there a (\w+) (\w+)\?', q):
                assert a == ('yes' if any((o['color'], o['shape']) == m.groups() for o in objs) else 'no'), x
            if m := re.fullmatch(r'how many (\w+) objects are there\?', q):
                assert a == NUMBERS[sum(o['color'] == m.group(1) for o in objs)], x
        assert rec['turns'][0]['content'].startswith('<image>\n')
        assert rec['turns'][-1]['content'] == rec['captions'][0]
        assert all(o['color'] in rec['captions'][0] and o['shape'] in rec['captions'][0] for o in objs)
    assert seen_types == set(QUESTION_TYPES)


def test_yes_and_no_are_balanced():
    answers = [x['a'] for _, rec in scenes(300) for x in rec['qa'] if x['type'] == 'exist']
    assert 0.4 < answers.count('yes') / len(answers) < 0.6


def test_on_disk_format(shapes_dir):
    meta = json.load(open(os.path.join(shapes_dir, 'meta.json')))
    assert meta['source'] == 'shapes' and meta['class_names'] == list(SHAPES)
    assert meta['counts'] == {'train': 96, 'val': 16, 'test': 16}
    images = np.load(os.path.join(shapes_dir, 'images.npy'), mmap_mode='r')
    assert images.shape == (128, 64, 64, 3) and images.dtype == np.uint8
    rows = set()
    for split in ('train', 'val', 'test'):
        recs = [json.loads(l) for l in open(os.path.join(shapes_dir, f'{split}.jsonl'))]
        assert len(recs) == meta['counts'][split]
        rows |= {r['image'] for r in recs}
        # the array row holds the image the record describes
        r = recs[3]
        split_id = ('train', 'val', 'test').index(split)
        img, rec = shapes_sample((meta['seed'], split_id, 3, 64, len(r['qa'])))
        assert np.array_equal(images[r['image']], img) and rec['qa'] == r['qa']
    assert rows == set(range(128))
