import json
import os
import sys

import numpy as np
import torch
from PIL import Image

from conftest import run
from checkpoint import tokenizer_from_state
from model import VLM, VLMConfig


def save_test_images(shapes_dir, folder, n=3):
    os.makedirs(folder, exist_ok=True)
    images = np.load(os.path.join(shapes_dir, 'images.npy'), mmap_mode='r')
    recs = [json.loads(l) for l in open(os.path.join(shapes_dir, 'test.jsonl'))][:n]
    paths = []
    for i, r in enumerate(recs):
        paths.append(os.path.join(folder, f'img{i}.png'))
        Image.fromarray(np.array(images[r['image']])).save(paths[-1])
    return paths, [np.array(images[r['image']]) for r in recs]


def reference_answers(out_dir, pixels, prompt):
    ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)
    model = VLM(VLMConfig.from_dict(ckpt['model_config']))
    model.load_state_dict(ckpt['model'])
    return model.eval().chat(tokenizer_from_state(ckpt['tokenizer']), np.stack(pixels), [prompt] * len(pixels))


def test_answers_match_the_model_for_a_file_and_a_folder(tiny_run, shapes_dir, tmp_path):
    paths, pixels = save_test_images(shapes_dir, tmp_path / 'imgs')
    prompt = 'how many objects are there?'
    expected = reference_answers(tiny_run, pixels, prompt)  # fp32 here; sample.py runs in float32 too
    p = run([sys.executable, 'sample.py', '--out_dir', tiny_run, '--image', paths[0], '--prompt', prompt,
             '--dtype=float32'])
    assert p.stdout.strip() == expected[0]
    p = run([sys.executable, 'sample.py', '--out_dir', tiny_run, '--image', str(tmp_path / 'imgs'),
             '--prompt', prompt, '--dtype=float32'])
    lines = [line.rstrip() for line in p.stdout.strip().splitlines()]
    assert lines == [f'{path}: {a}'.rstrip() for path, a in zip(paths, expected)]


def test_chat_reads_questions_until_an_empty_line(tiny_run, shapes_dir, tmp_path):
    paths, _ = save_test_images(shapes_dir, tmp_path / 'imgs', n=1)
    p = run([sys.executable, 'sample.py', '--out_dir', tiny_run, '--image', paths[0], '--chat'],
            input='how many objects are there?\nwhat color is the circle?\n\n')
    assert p.stdout.count('glimpse:') == 2


def test_missing_checkpoint_and_bad_image_are_one_line_errors(tiny_run, tmp_path):
    bad = tmp_path / 'bad.png'
    bad.write_text('not an image')
    p = run([sys.executable, 'sample.py', '--out_dir', str(tmp_path / 'nowhere'), '--image', str(bad)], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and 'ckpt.pt not found' in p.stderr
    p = run([sys.executable, 'sample.py', '--out_dir', tiny_run, '--image', str(bad)], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and f'cannot read {bad}' in p.stderr
    p = run([sys.executable, 'sample.py', '--out_dir', tiny_run, '--image', str(tmp_path / 'none.png')], check=False)
    assert p.returncode != 0 and 'not found' in p.stderr
