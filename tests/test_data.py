"""data.py: the on-disk format's batches (which tokens carry the loss, truncation, the data order) and the one
image fit that prepared datasets and inference share."""
import gc
import json
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import prepare_data
from data import DataOrder, Records, StepBatches, VLMDataset, collate, encode_sample, fit, image_pixels
from model import IGNORE_INDEX
from tokenizer import Tokenizer


def test_resize_crop_and_pad():
    img = Image.new('RGB', (40, 20), (255, 0, 0))
    img.paste((0, 255, 0), (0, 0, 10, 20))  # a green band on the left quarter
    crop = np.asarray(fit(img, 10, 'crop'))
    pad = np.asarray(fit(img, 10, 'pad'))
    assert crop.shape == pad.shape == (10, 10, 3)
    assert (crop[..., 0] > 200).all()  # the center square: all red, the green band cut off
    assert (pad[:2] == 0).all() and (pad[-2:] == 0).all()  # 10x5 picture on black, rows 0-1 and 8-9 empty
    assert pad[5, 0, 1] > 200 and pad[5, 9, 0] > 200


def test_inference_sees_the_pixels_a_prepared_dataset_holds(tmp_path):
    """sample.py and classify.py fit an image file as prepare_data.py fit the training images: the same pixels."""
    rng = np.random.default_rng(0)
    root = tmp_path / 'photos' / 'only'
    root.mkdir(parents=True)
    for i, (w, h) in enumerate(((40, 30), (30, 52), (32, 32))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f'{i}.png')
    prepare_data.main(['imagefolder', '--root', str(tmp_path / 'photos'), '--out_dir', str(tmp_path / 'd'),
                       '--image_size', '16', '--val_fraction', '0', '--test_fraction', '0', '--workers', '1'])
    ds = VLMDataset(str(tmp_path / 'd'), 'train')
    for r in ds.records:
        path = str(tmp_path / 'photos' / r['id'])
        assert np.array_equal(image_pixels(path, 16), ds.images[r['image']]), r['id']
        assert np.array_equal(image_pixels(Image.open(path), 16), ds.images[r['image']])
    assert image_pixels(str(root / '0.png')).shape == (30, 40, 3)  # no size: as it is (a processor resizes)
    with pytest.raises(SystemExit, match='cannot read'):
        image_pixels(str(tmp_path / 'photos'), 16)


def write_split(d, lines, split='train'):
    d.mkdir(exist_ok=True)
    np.save(d / 'images.npy', np.zeros((1, 4, 4, 3), np.uint8))
    (d / 'meta.json').write_text(json.dumps({'source': 'test', 'image_size': 4}))
    (d / f'{split}.jsonl').write_text(''.join(l + '\n' for l in lines))


def test_records_are_indexed_by_byte_offset_and_parsed_when_asked_for(tmp_path):
    """VLMDataset.records holds byte offsets, not dicts: no Python object per record (so forked DataLoader workers
    share its pages), each record parsed from its line when asked for, as the list of dicts it replaces read."""
    recs = [{'id': str(i), 'image': i, 'turns': [{'role': 'user', 'content': f'<image>\nq{i} \u00e9'},
                                                  {'role': 'assistant', 'content': f'a{i}'}]} for i in range(3000)]
    recs[7] = {'id': '7', 'image': 7, 'captions': ['one', 'two', 'three']}  # expanded to one record per caption
    write_split(tmp_path / 'd', [json.dumps(r) for r in recs])
    expected = recs[:7] + [{**recs[7], 'captions': [c]} for c in recs[7]['captions']] + recs[8:]
    gc.collect()
    before = len(gc.get_objects())
    ds = VLMDataset(str(tmp_path / 'd'), 'train')
    gc.collect()
    assert len(gc.get_objects()) - before < 100  # a list of dicts: 3000 records, each with turns, ~10 objects apiece
    assert isinstance(ds.records, Records) and ds.records.offsets.dtype == np.int64
    assert len(ds) == len(ds.records) == 3002 and ds.records.offsets.nbytes + ds.records.lengths.nbytes + \
        ds.records.caption.nbytes == 16 * len(ds)
    assert ds.records[0] == expected[0] and ds.records[-1] == expected[-1] and ds.records[8] == expected[8]
    assert ds.records[5:10] == expected[5:10] and list(ds.records) == expected
    ds.records[0]['turns'].clear()  # a fresh dict each time: changing one changes nothing held
    assert ds.records[0] == expected[0]
    with pytest.raises(IndexError):
        ds.records[3002]
    assert list(VLMDataset(str(tmp_path / 'd'), 'train', max_samples=9).records) == expected[:9]
    assert len(VLMDataset(str(tmp_path / 'd'), 'train', expand_captions=False)) == 3000
    assert list(pickle.loads(pickle.dumps(ds.records))) == expected  # to a spawned worker: the index, no descriptor
    loader = torch.utils.data.DataLoader(ds.records, batch_size=None, num_workers=2, collate_fn=lambda r: r)
    assert list(loader) == expected  # forked workers, the parent's descriptor already open


@pytest.mark.parametrize('line, why', [('{"id": 2, "image": 1', 'not valid JSON'), ('[1, 2]', 'not a JSON object'),
                                       ('', 'not valid JSON'), (b'{"id": "\xff"}', 'not valid JSON')])
def test_a_bad_record_line_names_the_file_and_line(tmp_path, line, why):
    write_split(tmp_path / 'd', ['{"id": 0, "image": 0}', '{"id": 1, "image": 0}'])
    with open(tmp_path / 'd' / 'train.jsonl', 'ab') as f:
        f.write((line if isinstance(line, bytes) else line.encode()) + b'\n')
    with pytest.raises(SystemExit, match=f'train.jsonl line 3 is {why}'):
        VLMDataset(str(tmp_path / 'd'), 'train')


# -----------------------------------------------------------------------------
# conversations: where the loss is, and what happens when a sample is too long

def test_multi_turn_loss_on_every_answer_and_nowhere_else():
    turns = [{'role': 'user', 'content': '<image>\nwhat is it?'}, {'role': 'assistant', 'content': 'a red square'},
             {'role': 'user', 'content': 'is it big?'}, {'role': 'assistant', 'content': 'no'},
             {'role': 'user', 'content': 'and the color?'}, {'role': 'assistant', 'content': 'red'}]
    tok = Tokenizer.build('word', [t['content'] for t in turns])
    ids, targets, _, _, cut = encode_sample(tok, turns, 4, 256)
    assert cut == 0
    # walk the sequence: the predicted token (ids[t+1]) is supervised iff it is inside an assistant turn
    role, want = None, []
    for t in range(len(ids) - 1):
        nxt = ids[t + 1]
        if nxt in (tok.user_id, tok.assistant_id):
            role = 'assistant' if nxt == tok.assistant_id else 'user'
            want.append(False)
        else:
            want.append(role == 'assistant')  # the answer's words and its <|end|>
    got = [x != IGNORE_INDEX for x in targets[:-1]]
    assert got == want and targets[-1] == IGNORE_INDEX
    answers = [tok.decode([x]) for x in targets if x != IGNORE_INDEX and x != tok.eot_id]
    assert answers == ['a', 'red', 'square', 'no', 'red'] and targets.count(tok.eot_id) == 3


class _Records:
    def __init__(self, recs, size=8):
        self.records, self.images = recs, np.zeros((len(recs), size, size, 3), np.uint8)


def test_too_long_samples_are_truncated_by_turns_counted_never_dropped():
    long_turns = [{'role': 'user', 'content': '<image>\nq0'}, {'role': 'assistant', 'content': 'a0'}]
    for k in range(1, 6):
        long_turns += [{'role': 'user', 'content': f'q{k}'}, {'role': 'assistant', 'content': f'a{k}'}]
    huge = [{'role': 'user', 'content': '<image>\nq0'}, {'role': 'assistant', 'content': ' '.join(['a1'] * 50)}]
    recs = [{'image': 0, 'turns': long_turns}, {'image': 1, 'turns': huge}, {'image': 2, 'turns': long_turns[:2]}]
    tok = Tokenizer.build('word', [t['content'] for r in recs for t in r['turns']])
    stats = Counter()
    batch = collate(_Records(recs), [0, 1, 2], tok, 4, 20, stats)
    assert batch['input_ids'].shape == (3, 20) and len(batch['images']) == 3 and stats['truncated'] == 2
    ids = batch['input_ids'][0][batch['attention_mask'][0]].tolist()
    # whole pairs only: the kept ones end with an answer and its <|end|>
    assert tok.decode(ids).split() == ['q0', 'a0', 'q1', 'a1'] and ids[-1] == tok.eot_id  # 17 tokens, a third pair: 23
    assert (batch['targets'][1] != IGNORE_INDEX).sum() > 0  # the over-long answer is cut, still trained on
    assert stats['truncated'] == 2
    with pytest.raises(SystemExit, match='max_seq_len=5'):
        collate(_Records(recs), [2], tok, 4, 5, stats)


def test_step_batches_follow_the_data_order_across_epochs():
    recs = [{'image': i, 'turns': [{'role': 'user', 'content': '<image>\nq'}, {'role': 'assistant', 'content': f'a{i}'}]}
            for i in range(10)]
    tok = Tokenizer.build('word', [t['content'] for r in recs for t in r['turns']])
    order = DataOrder(10, 3, epoch=1, cursor=4)  # a resumed run, mid-epoch
    steps = StepBatches(_Records(recs), DataOrder(10, 3, epoch=1, cursor=4), 3, 2, 2, 1,
                        dict(tokenizer=tok, num_image_tokens=1, max_len=64))
    for k in range(5):  # 12 samples a step: every step crosses or nears an epoch boundary
        idx = order.take(12)
        micro, _, state = steps[k]
        assert state == order.state()
        for m, b in enumerate(micro):  # rank 1 of 2, micro-step m: the slice inline training takes
            want = idx[(m * 2 + 1) * 3:(m * 2 + 2) * 3]
            assert [tok.decode([int(x)]) for x in b['targets'][b['targets'] > tok.eot_id]] == [f'a{i}' for i in want]
