"""checkpoint.py: the spec train_vlm.py builds its model from, and the parts of earlier runs (llm=, vision=)."""
import re

import pytest
import torch

import checkpoint
from checkpoint import ModelSpec, from_checkpoint, load_vision
from configurator import script_defaults
from model import ViTConfig, VisionTower
from siglip import SigLIP, SigLIPConfig, TextConfig


def test_model_spec_holds_train_vlm_keys_and_defaults():
    """A renamed or re-defaulted key of train_vlm.py fails here, not in a run: every ModelSpec field is a key of
    the script with the same default."""
    script = script_defaults('train_vlm.py')
    spec = ModelSpec()
    for name, value in vars(spec).items():
        if name == 'lora_targets':  # the script's default is lora.DEFAULT_TARGETS by name, as the spec's
            from lora import DEFAULT_TARGETS
            assert value == DEFAULT_TARGETS and 'lora_targets' in open('train_vlm.py').read()
            continue
        assert name in script, f'ModelSpec.{name} is not a key of train_vlm.py'
        assert script[name] == value, (name, script[name], value)
    assert ModelSpec.from_config(dict(script, llm_mode='lora', batch_size=7)).llm_mode == 'lora'


def test_vision_layer_cuts_a_run_tower_at_that_block(tmp_path):
    """vision_layer=-2 on a stage-1 run: the penultimate block's raw output (LLaVA's choice), built without the
    blocks after it; -1 is the tower as trained; a layer the tower does not have is a one-line error."""
    torch.manual_seed(0)
    cfg = SigLIPConfig(vision=ViTConfig(image_size=16, patch_size=4, n_layer=3, n_head=2, n_embd=16),
                       text=TextConfig(vocab_size=20, max_len=8, n_layer=1, n_head=2, n_embd=16), embed_dim=8)
    stage1 = SigLIP(cfg)
    torch.save({'model': stage1.state_dict(), 'model_config': cfg.to_dict()}, tmp_path / 'ckpt.pt')
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    t = stage1.vision_tower.eval()
    with torch.no_grad():
        x = t.patch_embed(t.pixels(images)).flatten(2).transpose(1, 2) + t.pos_embed
        penultimate = t.blocks[1](t.blocks[0](x))
        last = t(images)
    for layer, want, n in ((-2, penultimate, 2), (2, penultimate, 2), (-1, last, 3)):
        vcfg, weights = load_vision(str(tmp_path), layer, False)
        assert vcfg.n_layer == n and vcfg.post_norm == (n == 3)
        tower = VisionTower(vcfg)
        tower.load_state_dict(weights)  # strict: exactly the weights of the blocks kept
        with torch.no_grad():
            torch.testing.assert_close(tower.eval()(images), want)
    for layer in (-4, 4):
        with pytest.raises(SystemExit, match=f'vision_layer={layer} but .* has 3 blocks'):
            load_vision(str(tmp_path), layer, False)


def test_trust_remote_code_comes_from_the_caller_never_from_a_checkpoint(monkeypatch):
    """A downloaded run whose saved config says trust_remote_code=True must not make sample.py or classify.py run
    the model's own code: only the person running the command turns it on."""
    asked = []

    class Recorder:  # stands in for pretrained.HFVLM: notes what it was asked, then stops the build
        def __init__(self, source, trust_remote_code=False):
            asked.append(trust_remote_code)
            raise RuntimeError('recorded')

    monkeypatch.setattr(checkpoint, 'HFVLM', Recorder)
    ckpt = {'config': dict(vars(ModelSpec(hf_vlm='some/vlm', llm_mode='lora')), trust_remote_code=True),
            'model': {}, 'base': {}, 'model_config': {}}
    for passed in (False, True):
        with pytest.raises(RuntimeError, match='recorded'):
            from_checkpoint(ckpt, trust_remote_code=passed)
    assert asked == [False, True]


def test_connector_norm_on_a_connector_without_the_mlp_is_a_config_error():
    from checkpoint import ModelSpec, vlm_config
    from errors import GlimpseError
    from tokenizer import Tokenizer
    tok = Tokenizer.build('word', ['<image>\nwhat color is it?', 'red'])
    with pytest.raises(GlimpseError, match="config error: connector_norm=True .* connector='bridge' leave it False"):
        ModelSpec(connector='bridge', connector_norm=True).check()
    assert vlm_config(ModelSpec(connector='mlp', connector_norm=True), tok).connector.out_norm


def test_an_unknown_connector_is_a_config_error_before_any_weights_load():
    """The llm named here does not exist: the connector's error must come first, as one line naming the choices;
    and every kind the check lets through is one model.build_connector builds."""
    from checkpoint import ModelSpec
    from errors import GlimpseError
    from model import CONNECTORS, ConnectorConfig, build_connector
    with pytest.raises(GlimpseError, match="config error: --connector='mpl': use one of mlp, pixel_shuffle, "):
        ModelSpec(connector='mpl', llm='/nonexistent/llm').check()
    for kind in CONNECTORS:
        build_connector(ConnectorConfig(kind=kind, in_dim=8, out_dim=16, scale_factor=2, n_head=2))


def test_a_patch_grid_pixel_shuffle_cannot_fold_is_one_line_before_anything_loads(tmp_path):
    """A newcomer's case: config/shapes.py (pixel_shuffle_factor=3) on 32-px images makes a 4x4 patch grid. One
    line names the key and the factors that work, before any data or weights load (the data directory and the
    LLM named here do not exist: their errors would come first otherwise)."""
    import sys

    from checkpoint import ModelSpec
    from conftest import run
    from errors import GlimpseError
    want = ("config error: pixel_shuffle_factor=3 folds 3x3 patches into a token, but image_size=32 with patch_size=8 "
            "makes a 4x4 grid: use pixel_shuffle_factor=1 or 2 or 4, an image_size of 24, 48, 72, ..., or "
            "connector='mlp'")
    with pytest.raises(GlimpseError) as e:
        ModelSpec(image_size=32, pixel_shuffle_factor=3, llm='/nonexistent/llm').check()
    assert str(e.value) == want
    ModelSpec(image_size=32, pixel_shuffle_factor=2).check()
    ModelSpec(image_size=72, pixel_shuffle_factor=3).check()
    p = run([sys.executable, 'train_vlm.py', 'config/shapes.py', f'--data_dir={tmp_path / "none"}', '--image_size=32',
             f'--out_dir={tmp_path / "out"}'], check=False)
    assert p.returncode == 1 and p.stderr.strip() == want and 'parameters' not in p.stdout


def test_config_refusals_come_before_any_weights_load():
    """Each bad choice is one line naming the key and what to use, from the spec alone (nothing named exists)."""
    from checkpoint import ModelSpec
    from errors import GlimpseError
    cases = [(dict(vision_mode='lorra'), "--vision_mode='lorra': use one of frozen, full, lora, qlora"),
             (dict(llm_mode='qlora', qlora_quant_type='int4'), "--qlora_quant_type='int4': use 'nf4' or 'fp4'"),
             (dict(attention='flex'), "attention='flex' trains on CUDA only"),
             (dict(system_prompt='be brief'), "system_prompt is for a pretrained LLM's chat template"),
             (dict(image_token_labels=('a', 'b')), 'image_token_labels names 2 image tokens but the model makes 16'),
             (dict(connector='mlp', image_token_labels=('a',) * 3),
              'image_token_labels names 3 image tokens but the model makes 64'),
             (dict(vision_layer=-2), "vision_layer and vision_cls choose features of a pretrained tower"),
             (dict(hf_vlm='/nonexistent/vlm', image_token_labels=('a',)), 'an hf_vlm\'s processor lays out'),
             (dict(init_from='/nonexistent/run'), '--init_from=/nonexistent/run: no ckpt.pt there')]
    for keys, message in cases:
        with pytest.raises(GlimpseError, match='^config error: .*' + re.escape(message)):
            ModelSpec(**keys).check('cpu')
    with pytest.raises(GlimpseError, match=re.escape("--optimizer=adamw8bit needs CUDA")):
        ModelSpec().check('cpu', {'optimizer': 'adamw8bit'})
    with pytest.raises(GlimpseError, match=re.escape("pack_samples=True needs image tokens in the sequence")):
        ModelSpec(connector='bridge').check('cpu', {'pack_samples': True})
