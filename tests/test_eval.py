import importlib.util
import json
import os
import random
import sys

import numpy as np
import pytest
import torch

from conftest import run

pytestmark = pytest.mark.skipif(importlib.util.find_spec('lmms_eval') is None,
                                reason='lmms-eval is not installed (an optional extra: README "Evaluate")')


def pope_by_hand(samples):
    """POPE's metrics as lmms-eval's pope task defines them, from the answers: an answer is its lower-cased, stripped
    text; a positive is 'yes', a negative 'no' (anything else is neither); its yes-ratio is the share of questions
    whose expected answer is yes (POPE's paper: the share of the model's answers that are)."""
    pred = [s['answer'].lower().strip() for s in samples]
    gt = [s['target'] for s in samples]
    tp = sum(p == g == 'yes' for p, g in zip(pred, gt))
    fp = sum(p == 'yes' and g == 'no' for p, g in zip(pred, gt))
    fn = sum(p == 'no' and g == 'yes' for p, g in zip(pred, gt))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {'pope_accuracy': sum(p == g for p, g in zip(pred, gt)) / len(gt), 'pope_precision': precision,
            'pope_recall': recall, 'pope_f1_score': f1, 'pope_yes_ratio': gt.count('yes') / len(gt)}


def yes_no_questions(shapes_dir, n):
    """The first n questions answered yes or no in the test split, with their images, in the order of the task."""
    images = np.load(os.path.join(shapes_dir, 'images.npy'), mmap_mode='r')
    out = [(np.array(images[r['image']]), qa['q'], qa['a'])
           for r in map(json.loads, open(os.path.join(shapes_dir, 'test.jsonl')))
           for qa in r['qa'] if qa['a'] in ('yes', 'no')]
    return out[:n]


def test_eval_py_scores_a_run_on_shapes_pope_through_lmms_eval(tiny_run, shapes_dir):
    p = run([sys.executable, 'eval.py', f'--out_dir={tiny_run}', '--tasks=shapes_pope', '--include_path=eval_tasks',
             '--limit=12', '--device=cpu', '--dtype=float32'])
    assert os.path.exists(os.path.join(shapes_dir, 'lmms_eval', 'shapes_pope.parquet'))  # made from the test split
    report = json.load(open(os.path.join(tiny_run, 'eval', 'shapes_pope.json')))
    assert f"shapes_pope: pope_accuracy {report['metrics']['pope_accuracy']:.4f}" in p.stdout
    samples = report['samples']
    assert report['samples_evaluated'] == len(samples) == 12
    assert report['metrics'] == pytest.approx(pope_by_hand(samples), abs=1e-12)
    # the questions and answers are glimpse's own: the same model asked the same questions about the same pixels
    from checkpoint import load_run
    model, tok = load_run(tiny_run, 'cpu')
    asked = yes_no_questions(shapes_dir, 12)
    expected = model.eval().chat(tok, np.stack([im for im, _, _ in asked]), [q for _, q, _ in asked], 128)
    assert [(s['question'], s['target'], s['answer']) for s in samples] == \
           [(q, a, e) for (_, q, a), e in zip(asked, expected)]


class Scripted(torch.nn.Module):
    """Stands in for a VLM: answers each question from a script, in the forms a model writes them."""

    def __init__(self, script):
        super().__init__()
        self.script = script
        self.w = torch.nn.Parameter(torch.zeros(1))  # a device to be on

    def chat(self, tok, images, prompts, max_new_tokens=32, **sampling):
        assert images.shape[1:] == (64, 64, 3) and images.dtype == np.uint8
        return [self.script[q] for q in prompts]


def test_run_tasks_scores_mixed_answers_as_pope_does_and_leaves_the_caller_as_it_was(shapes_dir, tmp_path):
    from benchmarks import run_tasks
    asked = yes_no_questions(shapes_dir, 1000)
    forms = ['no', 'yes ', 'No.', 'NO']  # for the questions whose answer is no; 'No.' is neither yes nor no
    model = Scripted({q: 'Yes' if a == 'yes' else forms[i % 4] for i, (_, q, a) in enumerate(asked)}).train()
    random.seed(1)
    torch.manual_seed(1)
    before = random.random(), torch.rand(1)
    random.seed(1)
    torch.manual_seed(1)
    scores = run_tasks(model, None, 'shapes_pope', include_path='eval_tasks', data_dir=shapes_dir, image_size=64,
                       results_dir=str(tmp_path))
    assert (random.random(), torch.rand(1)) == before  # simple_evaluate seeds the global generators, not ours
    assert model.training
    samples = json.load(open(tmp_path / 'shapes_pope.json'))['samples']
    assert len(samples) == len(asked) and {s['answer'] for s in samples} >= {'Yes', 'no', 'yes ', 'No.'}
    assert scores['shapes_pope'] == pytest.approx(pope_by_hand(samples), abs=1e-12)
    assert 0 < scores['shapes_pope']['pope_precision'] < 1 and 0 < scores['shapes_pope']['pope_accuracy'] < 1


def test_eval_tasks_during_training_go_to_metrics_jsonl_and_the_curves(shapes_dir, tmp_path):
    """eval_tasks='shapes_pope' with eval_limit: at each eval, lmms-eval's POPE metrics beside the val loss in
    metrics.jsonl, and drawn (dashed) in training_curves.png."""
    from conftest import TINY
    run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={tmp_path}', *TINY, '--max_iters=2',
         '--eval_interval=2', '--batch_size=8', '--test_at_end=False', '--eval_tasks=shapes_pope', '--eval_limit=8',
         '--plot_curves=True'])
    evals = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if 'val_loss' in l]
    assert [e['iter'] for e in evals] == [0, 2]
    for e in evals:
        scores = e['benchmarks']
        assert set(scores) >= {'shapes_pope/pope_accuracy', 'shapes_pope/pope_f1_score'}
        assert all(0 <= v <= 1 for k, v in scores.items() if k.endswith(('accuracy', 'f1_score')))
    if importlib.util.find_spec('matplotlib'):
        assert (tmp_path / 'training_curves.png').stat().st_size > 0
