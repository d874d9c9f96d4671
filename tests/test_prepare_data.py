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
        # then one caption per object: its size, colour and shape
        assert rec['captions'][1:] == [f"a {o['size']} {o['color']} {o['shape']}." for o in objs]
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


# -----------------------------------------------------------------------------
# real sources, each from a small fixture in its distributed layout

import csv
import pickle
import sys

import pytest
from PIL import Image

import prepare_data
from conftest import TINY, run
from data import VLMDataset
from prepare_data import IMAGE_TOKEN

CIFAR_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def make_cifar(root, per_batch=6, n_test=5, seed=0):
    """cifar-10-batches-py as distributed: pickled dicts with byte-string keys, (n, 3072) uint8 rows
    holding the R, G and B planes. Returns the (N, 32, 32, 3) train and test pixels and labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    with open(root / 'batches.meta', 'wb') as f:
        pickle.dump({b'label_names': [c.encode() for c in CIFAR_CLASSES], b'num_vis': 3072}, f)
    out = {}
    for name, n in [(f'data_batch_{i}', per_batch) for i in range(1, 6)] + [('test_batch', n_test)]:
        px = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(root / name, 'wb') as f:
            pickle.dump({b'batch_label': name.encode(), b'labels': labels,
                         b'data': px.transpose(0, 3, 1, 2).reshape(n, 3072),
                         b'filenames': [f'img_{name}_{i}.png'.encode() for i in range(n)]}, f)
        out[name] = (px, labels)
    train = [out[f'data_batch_{i}'] for i in range(1, 6)]
    return (np.concatenate([p for p, _ in train]), sum((l for _, l in train), []), *out['test_batch'])


def records(d, split):
    return [json.loads(l) for l in open(os.path.join(d, f'{split}.jsonl'))]


def prepare(*args):
    prepare_data.main([*map(str, args), '--workers', '1'])


def test_cifar10_batches_labels_pixels_and_splits(tmp_path):
    train_px, train_y, test_px, test_y = make_cifar(tmp_path / 'cifar-10-batches-py')
    out = tmp_path / 'cifar'
    prepare('cifar10', '--root', tmp_path / 'cifar-10-batches-py', '--out_dir', out, '--val_fraction', '0.1')
    meta = json.load(open(out / 'meta.json'))
    assert meta['class_names'] == CIFAR_CLASSES and meta['image_size'] == 32
    assert meta['counts'] == {'train': 27, 'val': 3, 'test': 5} and meta['skipped'] == {}
    images = np.load(out / 'images.npy', mmap_mode='r')
    assert images.shape == (35, 32, 32, 3)
    tr, va, te = records(out, 'train'), records(out, 'val'), records(out, 'test')
    for i, r in enumerate(tr + va):  # the training batches in order, the last 10% held out for val
        assert np.array_equal(images[r['image']], train_px[i]) and r['label'] == train_y[i]
    for i, r in enumerate(te):
        assert np.array_equal(images[r['image']], test_px[i]) and r['label'] == test_y[i]
    r = te[0]
    name = CIFAR_CLASSES[r['label']]
    assert r['turns'] == [{'role': 'user', 'content': f'{IMAGE_TOKEN}\nwhat is in the image?'},
                          {'role': 'assistant', 'content': name}]
    assert r['captions'] == [f'a photo of a {name}.'] and r['qa'] == [{'q': 'what is in the image?', 'a': name, 'type': 'class'}]


def test_cifar10_image_size_given_with_an_equals_sign_is_kept(tmp_path):
    make_cifar(tmp_path / 'cifar-10-batches-py', per_batch=2, n_test=2)
    for flag, size in ((['--image_size=48'], 48), (['--image_size', '40'], 40), ([], 32)):
        out = tmp_path / f'out{size}'
        prepare('cifar10', '--root', tmp_path / 'cifar-10-batches-py', '--out_dir', out, *flag)
        assert json.load(open(out / 'meta.json'))['image_size'] == size
        assert np.load(out / 'images.npy').shape[1:] == (size, size, 3)


def test_cifar10_descriptions_csv(tmp_path):
    train_px, train_y, _, _ = make_cifar(tmp_path / 'cifar-10-batches-py')
    csv_path = tmp_path / 'descriptions.csv'
    with open(csv_path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['Dataset_Index', 'A1', 'A2', 'A3', 'A4', 'A5'])
        for i in range(0, 30, 2):  # every other training image is described
            w.writerow([i] + [f'text {k} of image {i}' for k in range(1, 6)])
        w.writerow([30000, 'a', 'b', 'c', 'd', 'e'])  # line 17: no such training image
        w.writerow(['seven', 'a', 'b', 'c', 'd', 'e'])  # line 18: not an index
    out = tmp_path / 'cifar_desc'
    prepare('cifar10', '--root', tmp_path / 'cifar-10-batches-py', '--out_dir', out, '--descriptions', csv_path,
            '--val_fraction', '0.2')
    meta = json.load(open(out / 'meta.json'))
    assert meta['skipped'] == {'bad_row': 2, 'no_description': 15}
    assert meta['counts'] == {'train': 12, 'val': 3, 'test': 5}
    bad = open(out / 'skipped.txt').read()
    assert f'{csv_path} line 17' in bad and f'{csv_path} line 18' in bad
    images = np.load(out / 'images.npy', mmap_mode='r')
    for r in records(out, 'train') + records(out, 'val'):
        i = int(r['id'].split('-')[1])
        assert i % 2 == 0 and r['captions'] == [f'text {k} of image {i}' for k in range(1, 6)]
        assert r['label'] == train_y[i] and np.array_equal(images[r['image']], train_px[i])
        assert r['turns'] == []
    # five captions per image: five training samples, each answering "describe the image."
    ds = VLMDataset(str(out), 'train')
    assert len(ds) == 60 and [r['captions'] for r in ds.records[:2]] == [['text 1 of image 0'], ['text 2 of image 0']]


def save_jpeg(path, size=(40, 30), color=(200, 30, 30)):
    Image.new('RGB', size, color).save(path, quality=95)


def test_coco_captions_and_bad_images(tmp_path):
    (tmp_path / 'train2017').mkdir()
    images, annotations = [], []
    for i in range(6):
        images.append({'id': 100 + i, 'file_name': f'{i:012d}.jpg', 'width': 40, 'height': 30})
        for k in range(2):
            annotations.append({'image_id': 100 + i, 'id': 10 * i + k, 'caption': f' A  photo {i}, caption {k}. '})
        if i < 4:
            save_jpeg(tmp_path / 'train2017' / f'{i:012d}.jpg', color=(40 * i, 0, 0))
    # image 4 is missing; image 5 is a truncated JPEG
    Image.new('RGB', (64, 64), (0, 90, 0)).save(tmp_path / 'full.jpg')
    data = open(tmp_path / 'full.jpg', 'rb').read()
    open(tmp_path / 'train2017' / f'{5:012d}.jpg', 'wb').write(data[:len(data) // 3])
    annotations.append({'image_id': 100, 'id': 999})  # no caption: a malformed annotation
    ann = tmp_path / 'captions_train2017.json'
    json.dump({'images': images, 'annotations': annotations}, open(ann, 'w'))
    out = tmp_path / 'coco'
    prepare('coco', '--annotations', ann, '--images', tmp_path / 'train2017', '--out_dir', out, '--image_size', '16',
            '--val_fraction', '0.25', '--test_fraction', '0.25')
    meta = json.load(open(out / 'meta.json'))
    assert meta['skipped'] == {'missing_image': 1, 'corrupt_image': 1, 'bad_row': 1}
    assert sum(meta['counts'].values()) == 4  # split by image before reading: 2 + 2 + 2, less the 2 bad ones
    assert all(len(records(out, k)) == n for k, n in meta['counts'].items())
    bad = open(out / 'skipped.txt').read().splitlines()
    assert any(str(tmp_path / 'train2017' / '000000000004.jpg') in b and 'missing' in b for b in bad)
    assert any(str(tmp_path / 'train2017' / '000000000005.jpg') in b and 'corrupt' in b for b in bad)
    assert any('annotations[12]' in b for b in bad)
    images = np.load(out / 'images.npy', mmap_mode='r')
    assert images.shape == (4, 16, 16, 3)
    for split in ('train', 'val', 'test'):
        for r in records(out, split):
            i = int(r['id']) - 100
            assert r['captions'] == [f'A photo {i}, caption 0.', f'A photo {i}, caption 1.']
            assert abs(int(images[r['image']][..., 0].mean()) - 40 * i) <= 3  # the right picture in the right row


def test_llava_conversations(tmp_path):
    (tmp_path / 'imgs').mkdir()
    for i in range(4):
        save_jpeg(tmp_path / 'imgs' / f'{i}.jpg')
    entries = [
        {'id': 'multi', 'image': '0.jpg', 'conversations': [
            {'from': 'human', 'value': 'What is this?\n<image>'}, {'from': 'gpt', 'value': 'A red square.'},
            {'from': 'human', 'value': 'Is it big?'}, {'from': 'gpt', 'value': 'No.'},
            {'from': 'human', 'value': 'A question left unanswered'}]},
        {'id': 'text', 'conversations': [{'from': 'human', 'value': 'hi'}, {'from': 'gpt', 'value': 'hello'}]},
        {'id': 'gpt-first', 'image': '1.jpg', 'conversations': [{'from': 'gpt', 'value': 'x'}]},
        {'id': 'one', 'image': '2.jpg', 'conversations': [
            {'from': 'human', 'value': '<image>\nDescribe.'}, {'from': 'gpt', 'value': 'Red.'}]},
        {'id': 'lost', 'image': 'nope.jpg', 'conversations': [
            {'from': 'human', 'value': '<image>\nDescribe.'}, {'from': 'gpt', 'value': 'Red.'}]},
    ]
    path = tmp_path / 'llava.json'
    path.write_text(json.dumps(entries, indent=1))
    out = tmp_path / 'llava'
    prepare('llava', '--json', path, '--images', tmp_path / 'imgs', '--out_dir', out, '--image_size', '8',
            '--val_fraction', '0', '--test_fraction', '0')
    meta = json.load(open(out / 'meta.json'))
    assert meta['skipped'] == {'text_only': 1, 'bad_row': 1, 'missing_image': 1} and meta['counts']['train'] == 2
    gpt_first_line = path.read_text().splitlines().index('  "id": "gpt-first",')  # its "{" is the line before
    assert f'{path} line {gpt_first_line}:' in open(out / 'skipped.txt').read()
    recs = {r['id']: r for r in records(out, 'train')}
    assert recs['multi']['turns'] == [
        {'role': 'user', 'content': '<image>\nWhat is this?'}, {'role': 'assistant', 'content': 'A red square.'},
        {'role': 'user', 'content': 'Is it big?'}, {'role': 'assistant', 'content': 'No.'}]
    assert recs['one']['turns'][0]['content'] == '<image>\nDescribe.'


def test_llava_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / 'bad.json'
    path.write_text('[\n {"id": 1, "image": "a.jpg"},\n {"id": 2 "image": "b.jpg"}\n]')
    with pytest.raises(SystemExit, match=r'bad.json line 3 is not valid JSON'):
        prepare('llava', '--json', path, '--images', tmp_path, '--out_dir', tmp_path / 'o')


def mode_images():
    """One image per PIL mode, with the RGB each should become."""
    rgba = Image.new('RGBA', (8, 8), (255, 0, 0, 0))  # fully transparent: white
    p = Image.new('P', (8, 8))
    p.putpalette([0, 0, 255] + [0] * 765)  # index 0 is blue
    i16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert i16.mode.startswith('I;16')
    return {'L': (Image.new('L', (8, 8), 100), (100, 100, 100)),
            'LA': (Image.new('LA', (8, 8), (0, 255)), (0, 0, 0)),
            'RGBA': (rgba, (255, 255, 255)),
            'P': (p, (0, 0, 255)),
            'CMYK': (Image.new('CMYK', (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
            'I16': (i16, (255, 255, 255))}


def test_imagefolder_modes_resize_and_shards(tmp_path):
    root = tmp_path / 'pets'
    expected = {}
    for name, (img, rgb) in mode_images().items():
        (root / f'class_{name}').mkdir(parents=True)
        img.save(root / f'class_{name}' / 'a.png' if name != 'CMYK' else root / f'class_{name}' / 'a.tif')
        expected[f'class {name}'] = rgb
    (root / 'class_L' / 'broken.png').write_bytes(b'not a png')
    out = tmp_path / 'folder'
    prepare('imagefolder', '--root', root, '--out_dir', out, '--image_size', '4', '--val_fraction', '0', '--test_fraction', '0')
    meta = json.load(open(out / 'meta.json'))
    assert meta['class_names'] == ['class_CMYK', 'class_I16', 'class_L', 'class_LA', 'class_P', 'class_RGBA']
    assert meta['skipped'] == {'corrupt_image': 1} and meta['counts']['train'] == 6
    assert 'broken.png: corrupt' in open(out / 'skipped.txt').read()
    ds = VLMDataset(str(out), 'train')
    for r in ds.records:
        name = r['turns'][1]['content']
        assert meta['class_names'][r['label']].replace('_', ' ') == name
        assert tuple(ds.images[r['image']][2, 2]) == expected[name], name
    # the same images in PNG shards read back identically, through VLMDataset
    sharded = tmp_path / 'folder_shards'
    prepare('imagefolder', '--root', root, '--out_dir', sharded, '--image_size', '4', '--val_fraction', '0',
            '--test_fraction', '0', '--shards', '--shard_format', 'png')
    assert not (sharded / 'images.npy').exists() and json.load(open(sharded / 'meta.json'))['storage'] == 'shards'
    ds2 = VLMDataset(str(sharded), 'train')
    assert [r['id'] for r in ds2.records] == [r['id'] for r in ds.records]
    for r in ds.records:
        assert np.array_equal(ds2.images[r['image']], ds.images[r['image']])


def test_csv_source_and_bad_rows(tmp_path):
    (tmp_path / 'img').mkdir()
    for i in range(5):
        save_jpeg(tmp_path / 'img' / f'{i}.jpg')
    path = tmp_path / 'data.csv'
    with open(path, 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['file', 'short', 'long', 'kind'])
        for i in range(5):
            w.writerow([f'img/{i}.jpg', f'short {i}', f'long text {i}', 'b' if i % 2 else 'a'])
        w.writerow(['', 'no image', 'here', 'a'])  # line 7
    out = tmp_path / 'csvdata'
    prepare('csv', '--csv', path, '--image_column', 'file', '--text_columns', 'short,long', '--label_column', 'kind',
            '--out_dir', out, '--image_size', '8', '--val_fraction', '0.2', '--test_fraction', '0.2')
    meta = json.load(open(out / 'meta.json'))
    assert meta['class_names'] == ['a', 'b'] and meta['skipped'] == {'bad_row': 1}
    assert meta['counts'] == {'train': 3, 'val': 1, 'test': 1}
    assert f'{path} line 7' in open(out / 'skipped.txt').read()
    for split in ('train', 'val', 'test'):
        for r in records(out, split):
            i = int(r['captions'][0].split()[-1])
            assert r['captions'] == [f'short {i}', f'long text {i}'] and r['label'] == i % 2
    with pytest.raises(SystemExit, match="has no column 'caption'"):
        prepare('csv', '--csv', path, '--image_column', 'file', '--text_columns', 'caption', '--out_dir', out)


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip('datasets')
    imgs = [Image.new('L' if i % 2 else 'RGB', (12, 10), 30 * i + 10 if i % 2 else (30 * i + 10, 0, 0)) for i in range(6)]
    ds = datasets.Dataset.from_dict(
        {'picture': imgs, 'terrain': [i % 3 for i in range(6)], 'note': [f'n{i}' for i in range(6)]},
        features=datasets.Features({'picture': datasets.Image(), 'note': datasets.Value('string'),
                                    'terrain': datasets.ClassLabel(names=['crater', 'dune', 'rock_field'])}))
    dd = datasets.DatasetDict({'train': ds, 'test': ds.select(range(2))})
    dd.save_to_disk(str(tmp_path / 'mars'))
    out = tmp_path / 'hfdata'
    prepare('hf', '--dataset', tmp_path / 'mars', '--out_dir', out, '--image_size', '8', '--val_fraction', '0.34')
    meta = json.load(open(out / 'meta.json'))
    assert meta['class_names'] == ['crater', 'dune', 'rock_field']
    assert meta['image_column'] == 'picture' and meta['label_column'] == 'terrain'
    assert meta['counts'] == {'train': 4, 'val': 2, 'test': 2}
    images = np.load(out / 'images.npy', mmap_mode='r')
    for r in records(out, 'train') + records(out, 'val'):
        i = int(r['id'].split('-')[1])
        assert r['label'] == i % 3 and r['turns'][1]['content'] == ['crater', 'dune', 'rock field'][i % 3]
        r_, g_ = int(images[r['image']][4, 4, 0]), int(images[r['image']][4, 4, 1])
        assert r_ == 30 * i + 10 and g_ == (30 * i + 10 if i % 2 else 0)  # greyscale rows became grey RGB
    # names by flag, checked against the number of classes
    prepare('hf', '--dataset', tmp_path / 'mars', '--out_dir', out, '--image_size', '8', '--class_names', 'pit,sand,rocks')
    assert json.load(open(out / 'meta.json'))['class_names'] == ['pit', 'sand', 'rocks']
    assert {r['turns'][1]['content'] for r in records(out, 'test')} == {'pit', 'sand'}
    with pytest.raises(SystemExit, match='--class_names has 2 names but .* has 3 classes'):
        prepare('hf', '--dataset', tmp_path / 'mars', '--out_dir', out, '--class_names', 'pit,sand')


def test_hf_missing_dataset_offline_is_one_line(tmp_path):
    pytest.importorskip('datasets')
    p = run([sys.executable, 'prepare_data.py', 'hf', '--dataset', 'no-such-user/no-such-dataset-glimpse',
             '--out_dir', str(tmp_path / 'x')], env_extra={'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'},
            check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("data error: cannot load dataset 'no-such-user/no-such-dataset-glimpse'")


# -----------------------------------------------------------------------------
# the whole path: prepared non-shapes data trains, and --inspect shows it

@pytest.fixture(scope='module')
def cifar_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('cifar')
    make_cifar(tmp / 'cifar-10-batches-py', per_batch=8, n_test=8)
    out = tmp / 'cifar'
    prepare('cifar10', '--root', tmp / 'cifar-10-batches-py', '--out_dir', out, '--shards', '--val_fraction', '0.2')
    return out


def test_train_vlm_runs_on_prepared_cifar_shards(cifar_shards, tmp_path):
    args = [sys.executable, 'train_vlm.py', f'--data_dir={cifar_shards}', *TINY, '--image_size=32', '--max_iters=4',
            '--eval_interval=4', '--batch_size=8', '--warmup_iters=1', '--dtype=float32']
    p = run(args + [f'--out_dir={tmp_path / "inline"}'])
    assert 'iter 4: loss' in p.stdout and 'train 32, val 8' in p.stdout
    assert 'held-out test accuracy on 8 questions' in p.stdout  # the class question on the test batch
    assert json.load(open(tmp_path / 'inline' / 'test_accuracy.json'))['accuracy'].keys() == {'all', 'class'}
    # shards decoded in two DataLoader workers: the same batches, so the same losses
    run(args + [f'--out_dir={tmp_path / "workers"}', '--num_workers=2', '--test_at_end=False'])
    losses = lambda d: [m['loss'] for m in map(json.loads, open(d / 'metrics.jsonl')) if 'loss' in m]
    assert losses(tmp_path / 'inline') == losses(tmp_path / 'workers') and len(losses(tmp_path / 'inline')) == 4


def test_inspect_prints_stats_and_writes_contact_sheet(cifar_shards, capsys):
    prepare_data.main(['--inspect', str(cifar_shards)])
    out = capsys.readouterr().out
    assert "counts {'train': 32, 'val': 8, 'test': 8}" in out and 'storage shards' in out
    assert 'answers:  32 texts' in out and 'what is in the image?' in out
    sheet = Image.open(cifar_shards / 'contact_sheet.png')
    assert sheet.size == (4 * 128, 4 * (128 + 48))




def test_pairs_hold_two_images_and_answers_true_to_both_scenes(tmp_path):
    """--pairs: each sample is two scenes, its record lists both rows, its first turn has one <image> per image,
    and every comparison answer follows from the two scenes' objects."""
    from prepare_data import NUMBERS, main
    out = tmp_path / 'pairs'
    main(['shapes', '--pairs', '--out_dir', str(out), '--n_train', '40', '--n_val', '4', '--n_test', '4',
          '--workers', '1'])
    images = np.load(out / 'images.npy', mmap_mode='r')
    assert len(images) == 2 * 48
    same = []
    for line in open(out / 'train.jsonl'):
        r = json.loads(line)
        a, b = r['objects']
        assert len(r['image']) == 2 and r['turns'][0]['content'].count('<image>') == 2
        large = [next(o for o in s if o['size'] == 'large') for s in (a, b)]
        same.append(large[0]['shape'] == large[1]['shape'])
        for x in r['qa']:
            want = {'which image has more objects?': 'the first' if len(a) > len(b) else 'the second'
                    if len(b) > len(a) else 'neither',
                    'is the large shape the same in both images?': 'yes' if same[-1] else 'no',
                    'what color is the large object in the first image?': large[0]['color'],
                    'what color is the large object in the second image?': large[1]['color'],
                    'how many objects are in the first image?': NUMBERS[len(a)],
                    'how many objects are in the second image?': NUMBERS[len(b)]}[x['q']]
            assert x['a'] == want
    assert 0.25 < np.mean(same) < 0.75


def test_several_images_a_sample_from_llava_onevision_json_and_csv_columns(tmp_path):
    """LLaVA-OneVision's "image": [...] and a CSV's several image columns become one sample with the list of its
    rows, in order; its placeholders are kept (or one per image prepended); a count that disagrees, or one image
    that cannot be read, skips the sample by line."""
    (tmp_path / 'imgs').mkdir()
    for i in range(4):
        Image.new('RGB', (8, 8), (40 * i, 0, 0)).save(tmp_path / 'imgs' / f'{i}.png')
    entries = [
        {'id': 'pair', 'image': ['0.png', '1.png'], 'conversations': [
            {'from': 'human', 'value': '<image>\n<image>\nWhich is redder?'}, {'from': 'gpt', 'value': 'The second.'}]},
        {'id': 'bare', 'image': ['2.png', '3.png', '0.png'], 'conversations': [
            {'from': 'human', 'value': 'Same?'}, {'from': 'gpt', 'value': 'No.'}]},
        {'id': 'miscount', 'image': ['0.png', '1.png'], 'conversations': [
            {'from': 'human', 'value': '<image>\nSame?'}, {'from': 'gpt', 'value': 'No.'}]},
        {'id': 'lost', 'image': ['0.png', 'nope.png'], 'conversations': [
            {'from': 'human', 'value': 'Same?'}, {'from': 'gpt', 'value': 'No.'}]},
    ]
    path = tmp_path / 'ov.json'
    path.write_text(json.dumps(entries))
    out = tmp_path / 'ov'
    prepare('llava', '--json', path, '--images', tmp_path / 'imgs', '--out_dir', out, '--image_size', '8',
            '--val_fraction', '0', '--test_fraction', '0')
    meta = json.load(open(out / 'meta.json'))
    assert meta['skipped'] == {'bad_row': 1, 'missing_image': 1} and meta['counts']['train'] == 2
    assert "2 images but 1 '<image>'" in open(out / 'skipped.txt').read()
    images = np.load(out / 'images.npy', mmap_mode='r')
    recs = {r['id']: r for r in records(out, 'train')}
    assert recs['pair']['turns'][0]['content'] == '<image>\n<image>\nWhich is redder?'
    assert recs['bare']['turns'][0]['content'] == '<image>\n<image>\n<image>\nSame?'
    for rid, want in (('pair', [0, 40]), ('bare', [80, 120, 0])):
        assert [int(images[row][..., 0].mean()) for row in recs[rid]['image']] == want
    with open(tmp_path / 'pairs.csv', 'w', newline='') as f:
        csv.writer(f).writerows([['left', 'right', 'kind'], ['imgs/0.png', 'imgs/1.png', 'same'],
                                 ['imgs/2.png', 'imgs/3.png', 'different']])
    prepare('csv', '--csv', tmp_path / 'pairs.csv', '--image_column', 'left,right', '--label_column', 'kind',
            '--out_dir', tmp_path / 'pc', '--image_size', '8', '--val_fraction', '0', '--test_fraction', '0')
    recs = records(tmp_path / 'pc', 'train')
    assert [len(r['image']) for r in recs] == [2, 2]
    assert all(r['turns'][0]['content'] == '<image>\n<image>\nwhat is in the image?' for r in recs)
