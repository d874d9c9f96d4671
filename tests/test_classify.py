import csv
import json
import os
import sys

import numpy as np
import pytest
import torch

import classify
from classify import parse_answer
from conftest import TINY, make_tiny_idefics3, run

SHAPES = ['circle', 'square', 'triangle', 'diamond', 'cross']


@pytest.mark.parametrize('text, expected', [
    ('Cat.', 'cat'),
    ('it is a DOG!', 'dog'),
    ('a cat', 'cat'),  # the article is not the class 'A'
    ('A', 'A'),  # ... unless it is the whole answer (multiple choice)
    ('category', None),  # 'cat' only as a whole word
    ('a caterpillar', None),
    ('cat or dog', None),  # two classes and no Answer: unparseable
    ('Reasoning: it has whiskers, not a dog. Answer: cat', 'cat'),
    ('Answer: dog. Reasoning: ... Answer: cat.', 'cat'),  # the last Answer: wins
    ('answer:kitty', 'cat'),  # an alias
    ('Answer: nothing I know', None),
    ('I see a sports car', 'sports car'),  # the longest name, not 'car'
    ('', None),
])
def test_parse_answer(text, expected):
    names = ['cat', 'dog', 'A', 'B', 'car', 'sports car']
    assert parse_answer(text, names, {'kitty': 'cat'}) == expected


def test_parse_answer_with_articles_as_classes():
    assert parse_answer('the answer is a triangle', SHAPES) == 'triangle'
    assert parse_answer('Answer: B, a circle', ['A', 'B', 'C']) == 'B'


def reference_scores(model_forward, seqs):
    """Mean log-probability of the supervised tokens of each full sequence, one at a time."""
    out = []
    for ids, sup, extra in seqs:
        logp = model_forward(ids, extra).float().log_softmax(-1)[0]  # (T, V)
        lp = [logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if sup[t]]
        out.append(sum(lp) / len(lp))
    return out


@pytest.mark.parametrize('bridge', [False, True])
def test_score_equals_one_class_at_a_time(tiny_run, shapes_dir, tmp_path, bridge):
    model = classify.load_model(tiny_run, device='cpu', dtype='float32')
    if bridge:  # the run's model with a bridge instead: every answer token must see the image
        from model import VLM, ConnectorConfig, VLMConfig
        cfg = VLMConfig.from_dict(model.model.cfg.to_dict())
        cfg.connector = ConnectorConfig(kind='bridge', in_dim=cfg.vision.n_embd, out_dim=cfg.llm.n_embd, n_head=4)
        model.model = VLM(cfg).eval()
        for gate in (model.model.connector.gate_attn, model.model.connector.gate_ff):
            gate.data.fill_(0.5)
    images = np.load(os.path.join(shapes_dir, 'images.npy'))[:3]
    prompt = 'what shape is the large object?'
    answers = SHAPES + ['a large square']  # answers of different lengths, so the batch is padded
    scores = model.score(list(images), prompt, answers)  # (3, 6), one batched pass
    m, tok = model.model, model.tok
    turns = [{'role': 'user', 'content': '<image>\n' + prompt}]
    for b in range(3):
        seqs = []
        for c in answers:  # the answer's tokens are supervised; its end-of-turn is not scored
            ids, sup = tok.encode_chat(turns + [{'role': 'assistant', 'content': c}], m.num_image_tokens)
            last = max(i for i, s in enumerate(sup) if s)
            seqs.append((ids, sup[:last] + [False] * (len(sup) - last), None))
        with torch.no_grad():
            ref = reference_scores(lambda ids, _: m(torch.tensor([ids]), torch.from_numpy(images[b:b + 1])), seqs)
        assert torch.allclose(scores[b], torch.tensor(ref), atol=1e-4), (scores[b], ref)
    # predict: argmax and softmax confidence; a PNG path gives the same as the array
    label, conf, text = classify.predict(model, images[0], SHAPES, template=prompt)
    assert label == SHAPES[int(scores[0, :5].argmax())]
    assert conf == pytest.approx(float(scores[0, :5].softmax(-1).max()), abs=1e-5)
    from PIL import Image
    Image.fromarray(images[0]).save(str(tmp_path / 'x.png'))
    assert classify.predict(model, str(tmp_path / 'x.png'), SHAPES, template=prompt)[0] == label
    out = classify.predict_batch(model, list(images), SHAPES, mode='generate', template=prompt, max_new_tokens=4)
    assert len(out) == 3 and all(c is None and (l is None or l in SHAPES) for l, c, _ in out)


@pytest.mark.parametrize('mode', ['score', 'generate'])
def test_classify_end_to_end(tiny_run, shapes_dir, tmp_path, mode):
    res = tmp_path / mode
    run([sys.executable, 'classify.py', f'--out_dir={tiny_run}', f'--data_dir={shapes_dir}', '--split=test',
         f'--mode={mode}', f'--results_dir={res}', '--dtype=float32', '--device=cpu', '--batch_size=8',
         '--max_new_tokens=4', '--reasoning=' + str(mode == 'generate')])
    result = json.load(open(res / 'results.json'))
    rows = list(csv.DictReader(open(res / 'predictions.csv')))
    assert len(rows) == result['n'] == result['images'] == 16
    records = [json.loads(l) for l in open(os.path.join(shapes_dir, 'test.jsonl'))]
    assert [r['label'] for r in rows] == [SHAPES[r['label']] for r in records]
    right = sum(r['label'] == r['prediction'] for r in rows)
    assert result['accuracy'] == pytest.approx(right / 16)
    assert sum(map(sum, result['confusion'])) == 16
    assert result['unparseable'] == sum(r['prediction'] == '' for r in rows)
    if mode == 'score':
        assert result['unparseable'] == 0 and all(0.2 <= float(r['confidence']) <= 1 for r in rows)
    else:
        assert all((parse_answer(r['text'], SHAPES) or '') == r['prediction'] for r in rows)
        assert 'Reasoning' in result['prompt']
    table = open(res / 'confusion.txt').read()
    assert table.splitlines()[0].split()[-1] == 'unparseable' and len(table.splitlines()) == 6


def test_bad_class_alias_and_prompt_file_are_one_line_errors(tiny_run, shapes_dir, tmp_path):
    p = run([sys.executable, 'classify.py', f'--out_dir={tiny_run}', f'--data_dir={shapes_dir}', '--aliases=sq=squar'],
            check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and "'sq=squar'" in p.stderr
    p = run([sys.executable, 'classify.py', f'--out_dir={tiny_run}', f'--data_dir={shapes_dir}',
             f'--template=@{tmp_path}/none.txt'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr and 'none.txt' in p.stderr


def test_hugging_face_vlm(shapes_dir, tmp_path):
    make_tiny_idefics3(tmp_path / 'idefics3')
    model = classify.load_model(hf_model=str(tmp_path / 'idefics3'), device='cpu', dtype='float32')
    images = list(np.load(os.path.join(shapes_dir, 'images.npy'))[:2])
    prompt, system = 'what shape is the large object?', 'be brief.'
    answers = SHAPES + ['large square']  # answers of different lengths, so the batch is padded
    scores = model.score(images, prompt, answers, system)  # (2, 6) from one batch
    head = model.chat_text(prompt, system)
    for b in range(2):
        seqs = []
        for c in answers:
            full = model.chat_text(prompt, system, c)
            batch = model.inputs([full[:full.rindex(c) + len(c)]], [images[b]])  # up to the answer's end
            ids = batch['input_ids'][0].tolist()
            n_head = model.inputs([head], [images[b]])['input_ids'].shape[1]
            seqs.append((ids, [t >= n_head for t in range(len(ids))], batch))
        with torch.no_grad():
            ref = reference_scores(lambda ids, batch: model.model(**batch).logits, seqs)
        assert torch.allclose(scores[b], torch.tensor(ref), atol=1e-4), (scores[b], ref)
    source = classify.ImageSource(shapes_dir, 'test', '', [], max_images=4)
    for mode in ('score', 'generate'):
        result = classify.classify(model, source, SHAPES, {}, mode, system, prompt, False, 4, str(tmp_path / mode),
                                   max_new_tokens=3)
        assert result['n'] == 4 and os.path.exists(tmp_path / mode / 'predictions.csv')
    texts = model.generate(images, 'describe the image.', max_new_tokens=3, temperature=1.0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# -----------------------------------------------------------------------------
# labelling and classification conversations

def test_labelling_resumes_after_a_crash(tiny_run, shapes_dir, tmp_path):
    path = str(tmp_path / 'labels.csv')
    calls = []

    def crashing(idx):
        calls.append(list(idx))
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the middle of the third batch
        return [[f'image {i} text {k}' for k in range(3)] for i in idx]

    with pytest.raises(KeyboardInterrupt):
        classify.label_dataset(crashing, 16, path, 3, batch_size=2)
    with open(path, 'a') as f:
        f.write('4,"image 4 text 0",ima')  # and a row cut off halfway by the crash
    classify.label_dataset(lambda idx: [[f'again {i} {k}' for k in range(3)] for i in idx], 16, path, 3, batch_size=2)
    rows = list(csv.reader(open(path)))
    assert rows[0] == ['Dataset_Index', 'A1', 'A2', 'A3']
    assert sorted(int(r[0]) for r in rows[1:]) == list(range(16))  # exactly one row per image
    assert rows[1] == ['0', 'image 0 text 0', 'image 0 text 1', 'image 0 text 2']  # kept, not redone
    assert rows[5] == ['4', 'again 4 0', 'again 4 1', 'again 4 2']

    # the command: a job interrupted after 5 rows is finished by the same command
    lines = open(path).read().splitlines()
    with open(tmp_path / 'real.csv', 'w') as f:
        f.write('\n'.join(lines[:6]).replace('again', 'kept') + '\n9,"half a')
    run([sys.executable, 'classify.py', '--mode=label', f'--out_dir={tiny_run}', f'--data_dir={shapes_dir}',
         f'--label_csv={tmp_path}/real.csv', '--num_descriptions=3', '--temperature=1.0', '--label_max_new_tokens=6',
         '--device=cpu', '--batch_size=6'])
    rows = list(csv.reader(open(tmp_path / 'real.csv')))
    assert sorted(int(r[0]) for r in rows[1:]) == list(range(16)) and all(len(r) == 4 for r in rows)
    assert rows[5][1] == 'kept 4 0'


def test_convert_to_classification_conversations(shapes_dir, tmp_path):
    out = str(tmp_path / 'cls')
    run([sys.executable, 'classify.py', '--mode=convert', f'--data_dir={shapes_dir}', f'--convert_dir={out}',
         '--reasoning=True'])
    recs = [json.loads(l) for l in open(os.path.join(out, 'train.jsonl'))]
    src = [json.loads(l) for l in open(os.path.join(shapes_dir, 'train.jsonl'))]
    assert len(recs) == len(src)
    r, s = recs[0], src[0]
    assert r['turns'][0]['content'] == '<image>\nwhat shape is the large object?'
    assert r['turns'][1]['content'] == f"Reasoning: {s['captions'][0]} Answer: {SHAPES[s['label']]}"
    assert parse_answer(r['turns'][1]['content'], SHAPES) == SHAPES[s['label']]
    assert r['qa'] == [{'q': 'what shape is the large object?', 'a': r['turns'][1]['content'], 'type': 'class'}]
    p = run([sys.executable, 'train_vlm.py', f'--data_dir={out}', f'--out_dir={tmp_path}/run', *TINY, '--max_iters=2',
             '--eval_interval=2', '--batch_size=4', '--test_at_end=False', '--eval_questions=4'])
    assert 'class' in p.stdout  # the evaluation asks the classification question
