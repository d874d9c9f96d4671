def test_training_curves_are_drawn_when_matplotlib_is_there_and_skipped_silently_when_not(tmp_path, monkeypatch,
                                                                                            capsys):
    import sys

    import pytest
    from PIL import Image

    from runtime import MetricsLogger
    logger = MetricsLogger(str(tmp_path))
    assert logger.plot() is None  # nothing logged yet
    for it in range(0, 30, 10):
        logger.log({'iter': it, 'loss': 3.0 / (it + 1)})
        logger.log({'iter': it, 'val_loss': 2.0 / (it + 1), 'accuracy': {'all': it / 30, 'color': it / 40}})
    pytest.importorskip('matplotlib')
    path = logger.plot()
    assert path == str(tmp_path / 'training_curves.png')
    with Image.open(path) as im:
        assert im.format == 'PNG' and im.size == (1100, 400)
    assert [p.name for p in tmp_path.iterdir() if 'tmp' in p.name] == []
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # as if not installed: import raises ImportError
    (tmp_path / 'training_curves.png').unlink()
    capsys.readouterr()
    assert logger.plot() is None
    assert capsys.readouterr() == ('', '') and not (tmp_path / 'training_curves.png').exists()


def test_generators_resume_from_a_checkpoint_mapped_to_another_device(tmp_path):
    """A resume on a GPU loads the checkpoint with map_location=cuda:N; map_location='meta' stands in for that
    here (a tensor there holds no data at all). Every generator must come back and draw as before."""
    import random

    import numpy as np
    import torch

    from runtime import rng_state, seed_everything, set_rng_state
    draw = lambda: (torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random())
    seed_everything(3)
    torch.save({'rng': [rng_state()]}, tmp_path / 'ckpt.pt')
    want = draw()
    seed_everything(4)
    set_rng_state(torch.load(tmp_path / 'ckpt.pt', map_location='meta', weights_only=True)['rng'][0])
    assert draw() == want


def test_auto_dtype_is_fp16_on_gpus_that_only_emulate_bf16(monkeypatch):
    """torch.cuda.is_bf16_supported() says True on a V100 or T4, whose bf16 is emulated (slow, no flash
    attention): 'auto' must pick fp16 with loss scaling there, and bf16 on an A100 or H100."""
    import torch

    from runtime import pick_dtype
    for capability, native, want in (((7, 0), False, 'float16'), ((7, 5), False, 'float16'),
                                     ((8, 0), True, 'bfloat16'), ((9, 0), True, 'bfloat16')):
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True, n=native: n or
                            including_emulation)
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None, c=capability: c)
        assert pick_dtype('auto', 'cuda') == want, capability
    assert pick_dtype('float32', 'cuda') == 'float32'


def test_the_process_group_waits_as_long_as_the_config_says(monkeypatch, tmp_path):
    """Under torchrun, rank 0 evaluates, checkpoints and tests while the others wait in a collective: the
    process group's timeout is the run's ddp_timeout_minutes, not NCCL's 10 minutes."""
    import datetime

    import torch.distributed as dist

    import runtime
    seen = {}
    monkeypatch.setattr(dist, 'init_process_group', lambda backend, **kw: seen.update(backend=backend, **kw))
    for k, v in (('RANK', '1'), ('LOCAL_RANK', '1'), ('WORLD_SIZE', '2')):
        monkeypatch.setenv(k, v)
    got = runtime.setup_training('cpu', 'float32', 0, {}, str(tmp_path), timeout_minutes=45)
    assert got[:4] == (True, 1, 1, 2) and seen == {'backend': 'gloo', 'timeout': datetime.timedelta(minutes=45)}
