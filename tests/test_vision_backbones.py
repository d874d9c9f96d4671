"""SigLIP, CLIP and DINOv2 vision checkpoints in the native ViT: tiny random models built from
transformers configs and saved with save_pretrained, compared with transformers' own forward pass
and image processors."""
import json
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, run
from checkpoint import from_checkpoint
from model import VisionTower
from pretrained import load_pretrained_vision

transformers = pytest.importorskip('transformers')

LAYERS = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4)


def save_tiny(kind, path, seed=0):
    """A tiny random vision model of this kind and its image processor, saved to path."""
    torch.manual_seed(seed)
    T = transformers
    if kind == 'siglip':
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**LAYERS, intermediate_size=64, image_size=32, patch_size=8))
        proc = T.SiglipImageProcessor(size={'height': 32, 'width': 32})
    elif kind == 'siglip_full':  # SiglipModel: the tower is its vision half
        model = T.SiglipModel(T.SiglipConfig(
            vision_config=dict(**LAYERS, intermediate_size=64, image_size=32, patch_size=8),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)))
        proc = T.SiglipImageProcessor(size={'height': 32, 'width': 32})
    elif kind == 'clip':
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**LAYERS, intermediate_size=64, image_size=32, patch_size=8))
        proc = T.CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
    elif kind in ('dinov2', 'dinov2_registers'):
        # trained at 48 px (6x6 positions), used at 32 (4x4): the positions are interpolated
        kw = dict(**LAYERS, mlp_ratio=2, image_size=48, patch_size=8, layerscale_value=0.5)
        model = T.Dinov2Model(T.Dinov2Config(**kw)) if kind == 'dinov2' else \
            T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**kw, num_register_tokens=2))
        proc = T.BitImageProcessor(size={'shortest_edge': 36}, crop_size={'height': 32, 'width': 32},
                                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    with torch.no_grad():  # random values everywhere, so that no tensor's mapping can hide behind a zero or a one
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() < 2 else 0.2)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return model.eval(), proc


def hf_hidden(model, pixels, layer):
    """transformers' features at a layer: last_hidden_state for -1, else the raw hidden_states[layer]."""
    vision = getattr(model, 'vision_model', model)
    out = vision(pixel_values=pixels, output_hidden_states=True)
    return out.last_hidden_state if layer == -1 else out.hidden_states[layer]


def smooth_image(seed=0, h=45, w=60):
    # smooth, so the resampling differences between implementations stay at rounding level
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(x / (5 + 3 * c) + y / (7 + c) + g.uniform(0, 6)) for c in range(3)], -1)
    return np.clip(img + g.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


CASES = [('siglip', -1, False), ('siglip', -2, False), ('siglip_full', -1, False), ('clip', -2, False),
         ('clip', -1, True), ('dinov2', -1, True), ('dinov2', 2, False), ('dinov2_registers', -1, False),
         ('dinov2_registers', -2, True)]


@pytest.mark.parametrize('kind,layer,keep_cls', CASES)
def test_native_tower_equals_transformers(kind, layer, keep_cls, tmp_path):
    model, proc = save_tiny(kind, tmp_path)
    cfg, state = load_pretrained_vision(str(tmp_path), layer, keep_cls)
    tower = VisionTower(cfg).eval()
    tower.load_state_dict(state)
    pixels = torch.randn(2, 3, 32, 32)  # the same normalised pixels into both
    with torch.no_grad():
        ref = hf_hidden(model, pixels, layer)
        ours = tower.features(pixels)
    regs = getattr(model.config, 'num_register_tokens', 0)
    cls = kind != 'siglip' and kind != 'siglip_full'
    expected = ref[:, int(cls) + regs:]  # registers are never features; the class token only when kept
    if keep_cls:
        expected = torch.cat([ref[:, :1], expected], dim=1)
    assert ours.shape == expected.shape == (2, 16 + keep_cls, 32)
    diff = (ours - expected).abs().max().item()
    print(f'{kind} layer {layer} keep_cls {keep_cls}: max abs diff {diff:.2e}')
    assert diff < 1e-4, diff
    assert tower.num_tokens == ours.shape[1]


@pytest.mark.parametrize('kind', ['siglip', 'clip', 'clip_int_sizes', 'dinov2'])
def test_preprocessing_equals_the_image_processor(kind, tmp_path):
    _, proc = save_tiny(kind.replace('_int_sizes', ''), tmp_path)
    if kind == 'clip_int_sizes':  # the older format of openai/clip-vit-base-patch16: "size": 224, "crop_size": 224
        path = tmp_path / 'preprocessor_config.json'
        p = json.loads(path.read_text())
        p.update(size=40, crop_size=32)
        path.write_text(json.dumps(p))
        proc = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    cfg, state = load_pretrained_vision(str(tmp_path))
    tower = VisionTower(cfg)
    for h, w in ((45, 60), (70, 33), (32, 32)):  # landscape, portrait (center crop off-axis), no resize
        img = smooth_image(h=h, w=w)
        ref = proc(images=[img], return_tensors='pt')['pixel_values']
        ours = tower.pixels(torch.from_numpy(img)[None])
        assert ours.shape == ref.shape == (1, 3, 32, 32)
        diff = (ours - ref).abs().max().item()
        print(f'{kind} {h}x{w}: max abs diff {diff:.2e}')
        assert diff < 1e-5, diff  # one level of 8 bits would be 1/255/std > 8e-3


def test_loader_refuses_a_missing_tensor_and_a_missing_model(tmp_path):
    model, _ = save_tiny('clip', tmp_path)
    from safetensors.torch import load_file, save_file
    path = tmp_path / 'model.safetensors'
    tensors = load_file(path)
    del tensors['encoder.layers.1.mlp.fc2.weight']
    save_file(tensors, path)
    with pytest.raises(SystemExit, match=r'encoder\.layers\.1\.mlp\.fc2\.weight .*not found'):
        load_pretrained_vision(str(tmp_path))
    tensors['encoder.layers.1.mlp.fc2.weight'] = torch.zeros(64, 32)  # transposed
    save_file(tensors, path)
    with pytest.raises(SystemExit, match=r'has shape \(64, 32\).*needs \(32, 64\)'):
        load_pretrained_vision(str(tmp_path))
    tensors['encoder.layers.1.mlp.fc2.weight'] = torch.zeros(32, 64)
    tensors['encoder.layers.0.mlp.fc3.weight'] = torch.zeros(3)  # a tensor the loader would silently drop
    save_file(tensors, path)
    with pytest.raises(SystemExit, match=r'1 tensors .* not mapped, e\.g\. encoder\.layers\.0\.mlp\.fc3\.weight'):
        load_pretrained_vision(str(tmp_path))
    with pytest.raises(SystemExit, match=r"'google/siglip-base-patch16-224' is not a local directory, a .gguf file or "
                                         r"a model in the Hugging Face cache.*hf download google/siglip-base-patch16-224"):
        load_pretrained_vision('google/siglip-base-patch16-224')


def test_frozen_tower_runs_without_autograd_and_the_connector_still_learns(tmp_path):
    from test_model import TEXTS, images
    from model import VLM, ConnectorConfig, DecoderConfig, VLMConfig
    from tokenizer import Tokenizer
    save_tiny('siglip', tmp_path)
    vit, state = load_pretrained_vision(str(tmp_path))
    tok = Tokenizer.build('word', TEXTS)
    model = VLM(VLMConfig(vit, ConnectorConfig(in_dim=32, out_dim=32),
                          DecoderConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                                        intermediate_size=64), tok.image_token_id))
    model.vision_tower.load_state_dict(state)
    seen = []
    model.vision_tower.register_forward_hook(lambda m, i, out: seen.append(out.requires_grad))
    for frozen in (False, True):
        model.vision_tower.requires_grad_(not frozen)
        out = model.image_embeddings(images(2, size=40))  # 40x40 images, squashed to the tower's 32x32
        out.sum().backward()
        assert seen[-1] is not frozen  # frozen: no graph, so no activations kept, through the tower
        assert model.connector.mlp.fc1.weight.grad is not None
        model.zero_grad(set_to_none=True)


def test_train_with_a_frozen_pretrained_siglip_tower(shapes_dir, tmp_path):
    tower = tmp_path / 'siglip'
    save_tiny('siglip', tower)
    out = tmp_path / 'out'
    run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={out}', *TINY,
         f'--vision={tower}', '--vision_mode=frozen', '--max_iters=30', '--eval_interval=30', '--batch_size=16',
         '--learning_rate=3e-3', '--warmup_iters=2', '--log_interval=5', '--test_at_end=False'])
    losses = {m['iter']: m['loss'] for m in map(json.loads, open(out / 'metrics.jsonl')) if 'loss' in m}
    assert losses[30] < 0.85 * losses[5], losses
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    # a frozen tower is not saved (only what trained, and how to rebuild the base); rebuilt, it is the pretrained one
    assert 'base' in ckpt and not any(k.startswith('vision_tower.') for k in ckpt['model'])
    _, state = load_pretrained_vision(str(tower))
    rebuilt = from_checkpoint(ckpt, 'cpu').vision_tower.state_dict()
    for k, v in state.items():  # 64x64 shapes images went through the 32x32 tower, whose weights did not move
        assert torch.equal(rebuilt[k], v), k
    assert ckpt['model_config']['vision']['source'] == str(tower)
    assert ckpt['config']['vision'] == str(tower) and ckpt['config']['vision_mode'] == 'frozen'


def test_a_hub_id_not_on_the_machine_is_one_line_saying_how_to_get_it(shapes_dir, tmp_path):
    p = run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={tmp_path}', *TINY,
             '--vision=openai/clip-vit-base-patch16', '--vision_layer=-2'],
            env_extra={'HF_HOME': str(tmp_path / 'empty_cache'), 'HF_HUB_OFFLINE': '1'}, check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    msg = p.stderr.strip().splitlines()[-1]
    assert msg.startswith("pretrained error: 'openai/clip-vit-base-patch16' is not a local directory, a .gguf file or "
                          "a model in the Hugging Face cache") and 'hf download openai/clip-vit-base-patch16' in msg, msg
