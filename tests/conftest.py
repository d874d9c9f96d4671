import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a model small enough that a training step takes milliseconds
TINY = ['--vit_layers=1', '--vit_width=32', '--vit_heads=2', '--llm_layers=2', '--llm_width=32',
        '--llm_heads=4', '--llm_kv_heads=2', '--llm_mlp_width=64', '--device=cpu', '--compile=False',
        '--eval_questions=20', '--val_batches=1', '--log_interval=1', '--peak_flops=1e12']


def run(args, env_extra=None, check=True, input=None):
    """Run a glimpse script (or torchrun) from the repository root; returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env_extra or {}))
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                       input=input)
    if check and p.returncode != 0:
        raise AssertionError(f'{" ".join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[:3000]}\n...\n{p.stderr[-3000:]}')
    return p


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
    """A small shapes dataset in the real on-disk layout."""
    d = tmp_path_factory.mktemp('data') / 'shapes'
    run([sys.executable, 'prepare_data.py', 'shapes', '--out_dir', str(d), '--n_train', '96', '--n_val', '16',
         '--n_test', '16', '--workers', '1'])
    return str(d)


@pytest.fixture(scope='session')
def tiny_run(shapes_dir, tmp_path_factory):
    """out_dir of a tiny model trained for a few steps on shapes_dir."""
    out = tmp_path_factory.mktemp('out') / 'tiny'
    run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={out}', *TINY,
         '--max_iters=20', '--eval_interval=20', '--batch_size=16', '--learning_rate=3e-3', '--warmup_iters=2',
         '--test_at_end=False'])
    return str(out)
