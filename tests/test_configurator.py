import pytest

from configurator import apply_config, script_defaults


def defaults():
    return {'batch_size': 32, 'learning_rate': 1e-3, 'compile': False, 'out_dir': 'out', 'betas': (0.9, 0.95),
            'MAX': 3, 'os': __import__('os')}


def test_overrides_and_config_file(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("batch_size = 8\nlearning_rate = 3e-4\nimport math\n_private = 1\n")
    g = defaults()
    out = apply_config([str(cfg), '--batch_size=16', '--compile', '--out_dir', '1e3', '--learning_rate=1'], g)
    assert out == {'batch_size': 16, 'learning_rate': 1.0, 'compile': True, 'out_dir': '1e3', 'betas': (0.9, 0.95)}
    assert g['batch_size'] == 16 and isinstance(g['learning_rate'], float)
    assert 'MAX' not in out and 'os' not in out  # constants and modules are not config keys


def test_unknown_key_names_the_nearest():
    with pytest.raises(SystemExit, match=r"unknown key '--batch_sise'.*did you mean 'batch_size'"):
        apply_config(['--batch_sise=4'], defaults())


def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("learning_rat = 1.0\n")
    with pytest.raises(SystemExit, match=r"c.py sets unknown key 'learning_rat'.*'learning_rate'"):
        apply_config([str(cfg)], defaults())


@pytest.mark.parametrize('arg', ['--batch_size=abc', '--batch_size=1.5', '--compile=1', '--betas=3'])
def test_wrong_type_is_refused(arg):
    with pytest.raises(SystemExit, match='config error'):
        apply_config([arg], defaults())


def test_missing_config_file():
    with pytest.raises(SystemExit, match='cannot read config file nope.py'):
        apply_config(['nope.py'], defaults())


def test_script_defaults_reads_train_vlm_without_running_it():
    d = script_defaults('train_vlm.py')
    assert d['batch_size'] > 0 and d['init_from'] == 'scratch' and 'config' not in d
