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
