"""SigLIP, CLIP and DINOv2 vision checkpoints in the native ViT: tiny random models built from
transformers configs and saved with save_pretrained, compared with transformers' own forward pass
and image processors."""
import os
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, run
from model import VisionTower, load_pretrained_vision

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


@pytest.mark.parametrize('kind', ['siglip', 'clip', 'dinov2'])
def test_preprocessing_equals_the_image_processor(kind, tmp_path):
    _, proc = save_tiny(kind, tmp_path)
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
    with pytest.raises(SystemExit, match=r"'google/siglip-base-patch16-224' is not a local directory and not in the "
                                         r"Hugging Face cache; download it once .*huggingface-cli download"):
        load_pretrained_vision('google/siglip-base-patch16-224')
