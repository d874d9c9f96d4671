"""Each recipe in config/ runs a few steps as written, with tiny random stand-ins for its pretrained models
(same families, saved like the real ones) and a tiny dataset prepared from its source's real layout."""
import json
import sys

import pytest
import torch

from conftest import run
from prepare_data import POSITIONS
from test_prepare_data import prepare, save_jpeg
from test_pretrained import save_tiny as save_tiny_llm
from test_vision_backbones import save_tiny as save_tiny_vision

SMOKE = ['--device=cpu', '--compile=False', '--num_workers=0', '--max_iters=2', '--eval_interval=2', '--batch_size=2',
         '--grad_accum=1', '--warmup_iters=1', '--val_batches=1', '--peak_flops=1e12', '--log_interval=1',
         '--plot_curves=False']


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    """A COCO captions annotation file and its image folder, prepared."""
    d = tmp_path_factory.mktemp('coco')
    (d / 'train2017').mkdir()
    images, annotations = [], []
    for i in range(8):
        images.append({'id': i, 'file_name': f'{i:012d}.jpg', 'width': 40, 'height': 30})
        annotations += [{'image_id': i, 'id': 10 * i + k, 'caption': f'a photo of thing {i} number {k}'}
                        for k in range(2)]
        save_jpeg(d / 'train2017' / f'{i:012d}.jpg', color=(30 * i, 20, 200 - 20 * i))
    json.dump({'images': images, 'annotations': annotations}, open(d / 'captions_train2017.json', 'w'))
    prepare('coco', '--annotations', d / 'captions_train2017.json', '--images', d / 'train2017', '--out_dir',
            d / 'data', '--image_size', '32', '--val_fraction', '0.25', '--test_fraction', '0')
    return d / 'data'


@pytest.fixture(scope='module')
def llava(tmp_path_factory):
    """A LLaVA conversation JSON (single- and multi-turn) and its images, prepared as shards."""
    d = tmp_path_factory.mktemp('llava')
    (d / 'imgs').mkdir()
    entries = []
    for i in range(8):
        save_jpeg(d / 'imgs' / f'{i}.jpg', color=(25 * i, 100, 50))
        turns = [{'from': 'human', 'value': '<image>\nWhat color is it?'}, {'from': 'gpt', 'value': f'shade {i}'}]
        if i % 2:
            turns += [{'from': 'human', 'value': 'Is it dark?'}, {'from': 'gpt', 'value': 'yes' if i < 4 else 'no'}]
        entries.append({'id': str(i), 'image': f'{i}.jpg', 'conversations': turns})
    (d / 'llava.json').write_text(json.dumps(entries))
    prepare('llava', '--json', d / 'llava.json', '--images', d / 'imgs', '--out_dir', d / 'data', '--image_size', '32',
            '--val_fraction', '0.25', '--test_fraction', '0', '--shards')
    return d / 'data'


def recipe(config, data_dir, out_dir, *overrides):
    p = run([sys.executable, 'train_vlm.py', config, f'--data_dir={data_dir}', f'--out_dir={out_dir}', *SMOKE,
             *overrides])
    evals = [json.loads(l) for l in open(out_dir / 'metrics.jsonl') if 'val_loss' in l]
    assert [e['iter'] for e in evals] == [0, 2] and all(e['val_loss'] == e['val_loss'] for e in evals)  # not NaN
    return p, torch.load(out_dir / 'ckpt.pt', weights_only=True)


def test_coco_recipe_clip_mlp_gpt2(coco, tmp_path):
    save_tiny_vision('clip', tmp_path / 'clip')
    save_tiny_llm('gpt2', tmp_path / 'gpt2')
    p, ckpt = recipe('config/coco.py', coco, tmp_path / 'out', f'--vision={tmp_path / "clip"}',
                     f'--llm={tmp_path / "gpt2"}', '--eval_captions=2')
    assert 'bleu4' in p.stdout and ckpt['config']['vision_mode'] == 'frozen' and ckpt['config']['llm_mode'] == 'full'
    assert not any(k.startswith('vision_tower.') for k in ckpt['model'])  # frozen: only what trained is saved


def test_llava_recipes_align_then_finetune_with_lora_and_single_stage(llava, tmp_path):
    save_tiny_vision('siglip', tmp_path / 'siglip')
    save_tiny_llm('phi', tmp_path / 'phi')
    parts = [f'--vision={tmp_path / "siglip"}', f'--llm={tmp_path / "phi"}', '--max_seq_len=96']
    _, align = recipe('config/llava_align.py', llava, tmp_path / 'align', *parts)
    assert set(k.split('.')[0] for k in align['model']) == {'connector'}  # towers frozen: only the projector
    _, ft = recipe('config/llava_finetune.py', llava, tmp_path / 'ft', *parts, f'--init_from={tmp_path / "align"}')
    assert any('lora_' in k for k in ft['model']) and ft['base']['init_from'] == str(tmp_path / 'align')
    _, single = recipe('config/llava_finetune.py', llava, tmp_path / 'single', *parts, '--init_from=scratch')
    assert any('lora_' in k for k in single['model']) and single['base']['init_from'] == 'scratch'


def test_groundcap_recipe_dinov2_bridge_gemma2(coco, tmp_path):
    save_tiny_vision('dinov2', tmp_path / 'dinov2')
    save_tiny_llm('gemma2', tmp_path / 'gemma2')
    p, ckpt = recipe('config/groundcap.py', coco, tmp_path / 'out', f'--vision={tmp_path / "dinov2"}',
                     f'--llm={tmp_path / "gemma2"}', '--eval_captions=2')
    assert set(k.split('.')[0] for k in ckpt['model']) == {'connector'} and 'connector.gate_attn' in ckpt['model']
    assert 'cider_d' in p.stdout


def test_cifar10_recipes_siglip_stage_then_qlora_vlm(tmp_path):
    import csv
    from test_prepare_data import make_cifar
    make_cifar(tmp_path / 'cifar-10-batches-py')
    with open(tmp_path / 'descriptions.csv', 'w', newline='') as f:  # classify.py --mode=label writes this
        w = csv.writer(f)
        w.writerow(['Dataset_Index', 'A1', 'A2', 'A3', 'A4', 'A5'])
        for i in range(30):
            w.writerow([i] + [f'description {k} of picture {i}' for k in range(1, 6)])
    prepare('cifar10', '--root', tmp_path / 'cifar-10-batches-py', '--descriptions', tmp_path / 'descriptions.csv',
            '--out_dir', tmp_path / 'data', '--val_fraction', '0.2')
    save_tiny_llm('llama', tmp_path / 'text_llm')  # stands in for Phi-2 as the frozen text tower
    save_tiny_llm('phi', tmp_path / 'phi')
    stage1 = tmp_path / 'siglip'
    run([sys.executable, 'train_siglip.py', 'config/cifar10_siglip.py', f'--data_dir={tmp_path / "data"}',
         f'--out_dir={stage1}', f'--text_tower={tmp_path / "text_llm"}', '--device=cpu', '--max_iters=2',
         '--eval_interval=2', '--batch_size=4', '--warmup_iters=1', '--log_interval=1'])
    _, ckpt = recipe('config/cifar10_vlm.py', tmp_path / 'data', tmp_path / 'vlm', f'--vision={stage1}',
                     f'--llm={tmp_path / "phi"}', '--eval_questions=2', '--eval_captions=2')
    assert ckpt['config']['llm_mode'] == 'qlora' and any('lora_' in k for k in ckpt['model'])
    assert not any(k.startswith('vision_tower.') for k in ckpt['model'])  # the stage-1 tower, frozen


def test_shapes_default_recipe_one_token_per_cell_and_muon(shapes_dir, tmp_path):
    """config/shapes.py as the Quick start runs it: the 64px scenes resized to 72, one image token per grid cell
    (9x9 patches, 3x3 pixel shuffle), Muon for the hidden matrices."""
    p, ckpt = recipe('config/shapes.py', shapes_dir, tmp_path / 'out', '--test_at_end=False', '--plot_curves=True')
    assert '9 image tokens' in p.stdout
    cfg = ckpt['model_config']
    assert cfg['vision']['image_size'] == 72 and cfg['connector']['scale_factor'] == 3
    muon, adamw = ckpt['optimizer']['muon_adamw']
    assert len(muon['param_groups'][0]['params']) == 4 * 4 + 4 * 7 + 2  # ViT and decoder matrices, connector MLP
    assert (tmp_path / 'out' / 'training_curves.png').exists() == bool(__import__('importlib').util.find_spec('matplotlib'))


def test_shapes_bridge_recipe(shapes_dir, tiny_run, tmp_path):
    """config/shapes_bridge.py: a shapes run's tower and LLM stay frozen; only the bridge trains."""
    p, ckpt = recipe('config/shapes_bridge.py', shapes_dir, tmp_path / 'out', f'--vision={tiny_run}',
                     f'--llm={tiny_run}', '--test_at_end=False', '--learning_rate=1e-2')
    assert '0 image tokens' in p.stdout
    assert {k.split('.')[0] for k in ckpt['model']} == {'connector'}  # what trained; the rest is the tiny run's
    assert ckpt['model']['connector.gate_attn'].abs().item() > 0  # the bridge moved off the identity


def test_shapes_export_recipe_exports_to_idefics3(shapes_dir, tmp_path):
    """config/shapes.py then config/shapes_export.py, as its header runs them, and export.py on the run."""
    _, ckpt = recipe('config/shapes.py', shapes_dir, tmp_path / 'out', 'config/shapes_export.py', '--test_at_end=False',
                     f'--out_dir={tmp_path / "out"}')
    assert ckpt['model_config']['connector']['kind'] == 'pixel_shuffle_linear'
    p = run([sys.executable, 'export.py', str(tmp_path / 'out'), str(tmp_path / 'hf')])
    assert 'as idefics3' in p.stdout and (tmp_path / 'hf' / 'model.safetensors').exists()


def test_shapes_smollm2_recipe_labels_the_cells_and_word_aligns_first(shapes_dir, tmp_path):
    """config/shapes_smollm2.py on a shapes.py tower, a tiny Llama standing in for SmolLM2: the connector's word
    alignment runs before step 1, the cells' position words are in the run's tokenizer, the LLM trains as LoRA."""
    recipe('config/shapes.py', shapes_dir, tmp_path / 'tower', '--test_at_end=False')
    save_tiny_llm('llama', tmp_path / 'llama')
    p, ckpt = recipe('config/shapes_smollm2.py', shapes_dir, tmp_path / 'out', f'--vision={tmp_path / "tower"}',
                     f'--llm={tmp_path / "llama"}', '--word_align_iters=10', '--word_align_batch=4',
                     '--max_seq_len=512', '--eval_questions=8', '--test_at_end=False')  # bytes: longer rows
    assert p.stdout.index('word align 10/10') < p.stdout.index('iter 1:')
    assert tuple(ckpt['tokenizer']['image_token_labels']) == POSITIONS
    assert any('lora_A' in k for k in ckpt['model']) and any(k.startswith('connector.') for k in ckpt['model'])


def test_shapes_detail_gguf_and_pairs_recipes(tmp_path):
    """config/shapes_detail.py (and config/shapes_gguf.py on top) on a 216px canvas, split 3x3 plus the global view,
    and config/shapes_pairs.py on two-scene samples, as their headers run them; the gguf run exports unforced."""
    from prepare_data import main
    detail, pairs = tmp_path / 'detail', tmp_path / 'pairs'
    small = ['--n_train', '8', '--n_val', '4', '--n_test', '4', '--workers', '1']
    main(['shapes', '--out_dir', str(detail), '--image_size', '216', '--object_scale', '0.5', *small])
    main(['shapes', '--pairs', '--out_dir', str(pairs), *small])
    out = tmp_path / 'gguf'  # shapes_gguf.py adds to shapes_detail.py only what llama.cpp does its own way
    p, ckpt = recipe('config/shapes.py', detail, out, 'config/shapes_detail.py', 'config/shapes_gguf.py',
                     '--test_at_end=False', f'--out_dir={out}', f'--data_dir={detail}', '--max_iters=2')
    assert ckpt['model_config']['max_image_size'] == 216 and ckpt['tokenizer']['tile_markers']
    p = run([sys.executable, 'export.py', str(out), str(tmp_path / 'files'), '--gguf'])
    assert 'FORCED' not in p.stdout and (tmp_path / 'files' / 'mmproj.gguf').exists()
    p, ckpt = recipe('config/shapes.py', pairs, tmp_path / 'pairs_run', 'config/shapes_pairs.py', '--test_at_end=False',
                     f'--out_dir={tmp_path / "pairs_run"}', f'--data_dir={pairs}', '--max_iters=2')
    assert 'more' in p.stdout  # the comparison questions are asked at eval
