import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run


def train(shapes_dir, out_dir, *extra, launcher=None):
    args = (launcher or [sys.executable]) + ['train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={out_dir}',
                                             *TINY, *extra]
    return run(args)


def train_losses(out_dir):
    lines = [json.loads(l) for l in open(os.path.join(out_dir, 'metrics.jsonl'))]
    return {m['iter']: m['loss'] for m in lines if 'loss' in m}


def weights(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)['model']


def test_tiny_training_run_loss_falls_and_reports_accuracy(shapes_dir, tmp_path):
    p = train(shapes_dir, tmp_path, '--max_iters=60', '--eval_interval=30', '--batch_size=16',
              '--learning_rate=3e-3', '--warmup_iters=5', '--log_interval=5', '--eval_captions=8')
    losses = train_losses(tmp_path)
    first, last = losses[5], losses[60]
    assert last < 0.6 * first, losses
    assert 'held-out test accuracy on 80 questions' in p.stdout
    result = json.load(open(tmp_path / 'test_accuracy.json'))
    assert result['questions'] == 80 and set(result['accuracy']) >= {'all', 'count', 'color'}
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['iter_num'] == 60 and ckpt['config']['batch_size'] == 16
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    evals = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl') if 'val_loss' in l]
    assert [e['iter'] for e in evals] == [0, 30, 60]
    assert all(abs(e['perplexity'] - 2.718281828 ** e['val_loss']) < 1e-6 * e['perplexity'] for e in evals)
    assert all(0 <= e['bleu4'] <= 1 and e['cider_d'] >= 0 for e in evals)
    # best.pt holds the lowest val loss; weights.pt is its model alone
    best = torch.load(tmp_path / 'best.pt', weights_only=True)
    assert best['best_val_loss'] == min(e['val_loss'] for e in evals[1:])
    exported = torch.load(tmp_path / 'weights.pt', weights_only=True)
    assert set(exported) == {'model', 'model_config', 'tokenizer', 'config'}
    assert all(torch.equal(exported['model'][k], v) for k, v in best['model'].items())


def test_bridge_connector_trains(shapes_dir, tmp_path):
    # frozen vision tower, trainable LLM and bridge; no image tokens in the sequence, turns isolated
    train(shapes_dir, tmp_path, '--connector=bridge', '--bridge_heads=4', '--vision_mode=frozen', '--max_iters=30',
          '--eval_interval=30', '--batch_size=16', '--learning_rate=3e-3', '--warmup_iters=2', '--isolate_turns=True',
          '--test_at_end=False', '--eval_questions=8')
    losses = train_losses(tmp_path)
    assert losses[30] < 0.75 * losses[1], losses
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['model']['connector.gate_attn'].abs() > 0  # the gate to the image is trained
    assert not any(k.startswith('vision_tower.') for k in ckpt['model'])  # frozen, not saved


def test_a_new_run_starts_from_the_tower_and_llm_of_an_earlier_one(shapes_dir, tmp_path):
    # vision= and llm= name an earlier run's out_dir: its trained parts, frozen here, around a new connector
    from checkpoint import from_checkpoint
    first, second = tmp_path / 'first', tmp_path / 'second'
    short = ['--batch_size=8', '--test_at_end=False', '--eval_questions=4']
    train(shapes_dir, first, '--max_iters=4', '--eval_interval=4', *short)
    train(shapes_dir, second, f'--vision={first}', f'--llm={first}', '--vision_mode=frozen', '--llm_mode=frozen',
          '--connector=mlp', '--max_iters=2', '--eval_interval=2', *short)
    ckpt = torch.load(second / 'ckpt.pt', weights_only=True)
    assert {k.split('.')[0] for k in ckpt['model']} == {'connector'}  # only the new connector trained and saved
    model, earlier = from_checkpoint(ckpt, 'cpu'), weights(first)
    for part in ('vision_tower', 'llm'):
        for k, v in getattr(model, part).state_dict().items():
            assert torch.equal(v, earlier[f'{part}.{k}']), (part, k)
    assert ckpt['model_config']['connector']['kind'] == 'mlp'


def test_early_stopping(shapes_dir, tmp_path):
    # learning rate 0: the val loss never improves on the first eval, so patience 2 stops at the second eval after it
    p = train(shapes_dir, tmp_path, '--max_iters=100', '--eval_interval=2', '--learning_rate=0.0', '--min_lr=0.0',
              '--early_stop_patience=2', '--batch_size=4', '--test_at_end=False', '--eval_questions=2')
    assert 'early stop' in p.stdout
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['iter_num'] == 4


def test_resume_continues_exactly(shapes_dir, tmp_path):
    # constant learning rate, so that stopping at 3 and going on to 6 follows the same schedule
    common = ['--batch_size=8', '--learning_rate=2e-3', '--min_lr=2e-3', '--warmup_iters=0', '--test_at_end=False',
              '--eval_interval=3']
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    train(shapes_dir, straight, '--max_iters=6', *common)
    train(shapes_dir, resumed, '--max_iters=3', *common)
    train(shapes_dir, resumed, '--max_iters=6', '--init_from=resume', *common)
    a, b = train_losses(straight), train_losses(resumed)
    for it in (4, 5, 6):
        assert abs(a[it] - b[it]) < 1e-6, (it, a, b)
    for k, v in weights(straight).items():
        torch.testing.assert_close(v, weights(resumed)[k], rtol=0, atol=0)


def test_two_process_ddp_matches_one_process(shapes_dir, tmp_path):
    # one process with 2 micro-steps of 4 == two processes with 1 micro-step of 4 each: the same
    # global batch, and answers of different lengths, so normalising by the global token count matters
    common = ['--max_iters=3', '--batch_size=4', '--test_at_end=False', '--eval_interval=100', '--dtype=float32',
              '--learning_rate=1e-2', '--warmup_iters=1', '--isolate_turns=True']
    one, two = tmp_path / 'one', tmp_path / 'two'
    train(shapes_dir, one, '--grad_accum=2', *common)
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    p = train(shapes_dir, two, '--grad_accum=1', *common, launcher=torchrun)
    assert 'world 2' in p.stdout
    a, b = train_losses(one), train_losses(two)
    for it in (1, 2, 3):
        assert abs(a[it] - b[it]) < 1e-5, (a, b)
    wa, wb = weights(one), weights(two)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


UNMEASURED = [a for a in TINY if not a.startswith('--peak_flops')]  # the run measures its matmul peak at start


@pytest.mark.parametrize('lora', [False, True])
def test_kill_9_at_a_random_moment_then_resume_ends_bit_identical(shapes_dir, tiny_run, tmp_path, lora):
    """A run killed with SIGKILL at a random moment after its first checkpoint, then resumed, ends with exactly
    the weights of an uninterrupted run: the full default recipe, and LoRA with dropout (whose masks come from
    the generators the checkpoint restores). checkpoint_minutes writes checkpoints between the evals."""
    extra = ['--max_iters=16', '--eval_interval=8', '--batch_size=8', '--learning_rate=2e-3', '--warmup_iters=2',
             '--test_at_end=False', '--eval_questions=4', '--checkpoint_minutes=1e-5']
    if lora:
        extra += [f'--init_from={tiny_run}', '--llm_mode=lora', '--vision_mode=lora', '--lora_r=4', '--lora_dropout=0.1']
    args = lambda out: [sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={out}', *UNMEASURED,
                        *extra]
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    p = run(args(straight))
    assert 'min of training since the last checkpoint' in p.stdout  # timed checkpoints between the evals
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.Popen(args(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = random.Random(int(lora))
    target, delay = rng.randint(2, 12), rng.uniform(0, 0.05)  # killed mid-step, mid-save or mid-eval after it
    while proc.poll() is None and not ((killed / 'ckpt.pt').exists() and
                                       torch.load(killed / 'ckpt.pt', weights_only=True)['iter_num'] >= target):
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = torch.load(killed / 'ckpt.pt', weights_only=True)['iter_num']
    print(f'killed {delay * 1000:.0f} ms after the checkpoint of iteration {target}; resuming from iteration {at}')
    assert at < 16  # it did stop before the end
    run(args(killed) + ['--init_from=resume'])
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and (not lora or all('lora_' in k or k.startswith('connector') for k in a))
    for k in a:
        assert torch.equal(a[k], b[k]), (k, at)


def test_fp16_loss_scale_is_saved_and_restored(shapes_dir, tmp_path):
    common = ['--batch_size=8', '--dtype=float16', '--test_at_end=False', '--eval_interval=2', '--eval_questions=2']
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    train(shapes_dir, straight, '--max_iters=4', *common)
    train(shapes_dir, resumed, '--max_iters=2', *common)
    train(shapes_dir, resumed, '--max_iters=4', '--init_from=resume', *common)
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (straight, resumed))
    assert a['scaler']['_growth_tracker'] == 4 and a['scaler'] == b['scaler']
    for k, v in a['model'].items():
        assert torch.equal(v, b['model'][k]), k


def test_the_test_and_weights_pt_are_of_the_best_checkpoint_not_the_last_step(shapes_dir, tmp_path):
    """A run whose last eval is not its best (after warmup the rate climbs toward min_lr=1.0): weights.pt and
    the held-out test are both of best.pt's model, and test_accuracy.json says which weights it tested."""
    from contextlib import nullcontext

    from checkpoint import load_run
    from data import VLMDataset
    from metrics import qa_accuracy
    train(shapes_dir, tmp_path, '--max_iters=20', '--eval_interval=10', '--batch_size=16', '--learning_rate=3e-3',
          '--warmup_iters=10', '--min_lr=1.0', '--test_questions=40')
    evals = {e['iter']: e['val_loss'] for e in map(json.loads, open(tmp_path / 'metrics.jsonl')) if 'val_loss' in e}
    assert evals[20] > evals[10]  # the last step is not the best
    result = json.load(open(tmp_path / 'test_accuracy.json'))
    assert result['weights'] == 'best.pt'
    best = torch.load(tmp_path / 'best.pt', weights_only=True)['model']
    assert all(torch.equal(v, best[k]) for k, v in torch.load(tmp_path / 'weights.pt', weights_only=True)['model'].items())
    model, tok = load_run(str(tmp_path), checkpoint='weights.pt')
    acc, n = qa_accuracy(model.eval(), VLMDataset(shapes_dir, 'test'), tok, 'cpu', nullcontext, 40)
    assert (acc, n) == (result['accuracy'], result['questions'])
