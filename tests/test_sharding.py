"""train_vlm.py --fsdp=True (sharding.py: FSDP2) on 2 gloo processes on the CPU, against DDP on the same seed and
data, and its sharded checkpoints: kill -9, then resume at 2 processes and at 1."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, run
from test_pretrained import save_tiny

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
# fp32; 2 micro-steps a step (FSDP's set_requires_gradient_sync on the first); a clip the gradients reach
COMMON = ['--max_iters=20', '--eval_interval=10', '--batch_size=4', '--grad_accum=2', '--dtype=float32',
          '--learning_rate=1e-2', '--warmup_iters=2', '--grad_clip=0.5', '--test_at_end=False', '--eval_questions=4',
          '--progress=False']


def args(shapes_dir, out_dir, *extra, launcher=TORCHRUN):
    return launcher + ['train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={out_dir}', *TINY, *COMMON, *extra]


def val_losses(out_dir):
    return {m['iter']: m['val_loss'] for m in map(json.loads, open(os.path.join(out_dir, 'metrics.jsonl')))
            if 'val_loss' in m}


def model_of(out_dir, name='ckpt.pt'):
    return torch.load(os.path.join(out_dir, name), weights_only=True)['model']


def assert_same_run(a, b, atol):
    """Val losses after 0, 10 and 20 steps within 1e-4, and the saved weights within atol."""
    la, lb = val_losses(a), val_losses(b)
    assert la.keys() == lb.keys() == {0, 10, 20}
    assert all(abs(la[i] - lb[i]) < 1e-4 for i in la), (la, lb)
    for name in ('ckpt.pt', 'weights.pt'):
        wa, wb = model_of(a, name), model_of(b, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol)
    print(f'val loss after 20 steps {la[20]:.7f} and {lb[20]:.7f}; weights differ by at most '
          f'{max((wa[k] - wb[k]).abs().max().item() for k in wa):.1e}')


@pytest.fixture(scope='module')
def fsdp_run(shapes_dir, tmp_path_factory):
    """The unbroken 2-process FSDP run, to compare DDP and the resumed runs with."""
    out = tmp_path_factory.mktemp('fsdp') / 'straight'
    p = run(args(shapes_dir, out, '--fsdp=True'))
    assert 'fsdp: 3 blocks and the root sharded over 2 processes' in p.stdout and 'world 2' in p.stdout
    return out


def test_fsdp_trains_as_ddp_does(shapes_dir, fsdp_run, tmp_path):
    run(args(shapes_dir, tmp_path))
    assert_same_run(tmp_path, fsdp_run, atol=1e-5)
    ckpt = torch.load(fsdp_run / 'ckpt.pt', weights_only=True)
    assert 'optimizer' not in ckpt and ckpt['sharded'] == os.path.join('sharded', 'iter_0000020')
    assert os.listdir(fsdp_run / 'sharded') == ['iter_0000020']  # older checkpoints' shards removed
    assert sorted(os.listdir(fsdp_run / 'sharded' / 'iter_0000020')) == ['.metadata', '__0_0.distcp', '__1_0.distcp']


def test_fsdp_lora_trains_as_ddp_does(shapes_dir, tmp_path):
    """LoRA (with dropout) on the decoder and the vision tower: the frozen base is sharded as the rest, the
    adapters and the connector train, and the checkpoints hold those alone."""
    lora = ['--llm_mode=lora', '--vision_mode=lora', '--lora_r=4', '--lora_dropout=0.1']
    ddp, fsdp = tmp_path / 'ddp', tmp_path / 'fsdp'
    run(args(shapes_dir, ddp, *lora))
    run(args(shapes_dir, fsdp, *lora, '--fsdp=True'))
    assert_same_run(ddp, fsdp, atol=1e-6)
    trained = model_of(fsdp)
    assert trained and all('lora_' in k or k.startswith('connector.') for k in trained)


def test_the_fsdp_units_of_a_hugging_face_llm_are_its_decoder_layers(tmp_path):
    """HFCausalLM (Phi, GPT-2, Gemma-2 ...): the classes its model's _no_split_modules names."""
    from pretrained import HFCausalLM
    from sharding import decoder_blocks
    for kind, layer in (('phi', 'PhiDecoderLayer'), ('gpt2', 'GPT2Block'), ('gemma2', 'Gemma2DecoderLayer')):
        blocks = decoder_blocks(HFCausalLM(model=save_tiny(kind, tmp_path / kind)))
        assert [type(b).__name__ for b in blocks] == [layer, layer], kind


def test_fsdp_killed_with_sigkill_resumes_as_the_unbroken_run_at_2_and_at_1_process(shapes_dir, fsdp_run, tmp_path):
    """kill -9 of the whole job at a random moment after a checkpoint (written at every step here: mid-step,
    mid-save, a .tmp of shards may be left), then: resumed on 2 processes it ends bit-identical to the unbroken
    run; resumed in 1 process without fsdp (twice the micro-steps: the same global batch) it loads the 2-process
    shards and ends as the unbroken run within fp32 rounding."""
    killed, single = tmp_path / 'killed', tmp_path / 'single'
    job = args(shapes_dir, killed, '--fsdp=True', '--checkpoint_minutes=1e-5')
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    proc = subprocess.Popen(job, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: torchrun and both workers
    rng = random.Random(34)
    target, delay = rng.randint(3, 14), rng.uniform(0, 0.05)
    while proc.poll() is None and not ((killed / 'ckpt.pt').exists() and
                                       torch.load(killed / 'ckpt.pt', weights_only=True)['iter_num'] >= target):
        time.sleep(0.005)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at = torch.load(killed / 'ckpt.pt', weights_only=True)['iter_num']
    print(f'killed {delay * 1000:.0f} ms after the checkpoint of iteration {target}; resuming from iteration {at}')
    assert at < 20
    shutil.copytree(killed, single)
    run(job + ['--init_from=resume'])
    for k, v in model_of(fsdp_run).items():
        assert torch.equal(v, model_of(killed)[k]), (k, at)
    assert val_losses(killed)[20] == val_losses(fsdp_run)[20]
    assert os.listdir(killed / 'sharded') == ['iter_0000020']
    p = run(args(shapes_dir, single, '--init_from=resume', '--grad_accum=4', launcher=[sys.executable]))
    assert 'world 1' in p.stdout
    la, lb = val_losses(single), val_losses(fsdp_run)
    assert abs(la[20] - lb[20]) < 1e-4, (la, lb, at)
    for k, v in model_of(fsdp_run).items():
        torch.testing.assert_close(model_of(single)[k], v, rtol=0, atol=1e-5)
    print(f'resumed in 1 process: val loss {la[20]:.7f} against {lb[20]:.7f}; weights differ by at most '
          f'{max((model_of(single)[k] - v).abs().max().item() for k, v in model_of(fsdp_run).items()):.1e}')


def test_fsdp_refuses_what_it_does_not_shard_before_any_work(monkeypatch, tmp_path):
    from checkpoint import ModelSpec
    from errors import GlimpseError
    spec = lambda **k: ModelSpec(**dict(dict(dtype='float32'), **k))
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    with pytest.raises(GlimpseError, match="torchrun --standalone --nproc_per_node=N"):
        spec().check('cpu', {'fsdp': True})
    monkeypatch.setenv('WORLD_SIZE', '2')
    spec().check('cpu', {'fsdp': True})
    for s, c, says in ((spec(llm_mode='qlora'), {}, "QLoRA's 4-bit base"), (spec(dtype='float16'), {}, 'bfloat16'),
                       (spec(), {'optimizer': 'muon'}, 'not --optimizer=muon'), (spec(hf_vlm='x'), {}, 'hf_vlm')):
        with pytest.raises(GlimpseError, match=says):
            s.check('cpu', dict(c, fsdp=True))
    torch.save({'optimizer': {}}, tmp_path / 'ckpt.pt')  # a run without fsdp: a whole optimizer state
    with pytest.raises(GlimpseError, match='written without fsdp'):
        spec(init_from='resume').check('cpu', {'fsdp': True, 'out_dir': str(tmp_path)})
