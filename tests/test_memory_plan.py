import copy
import re
import sys

import pytest
import torch

from conftest import TINY, run
from configurator import apply_config, script_defaults
from memory_plan import GiB, plan, plan_model, saved_for_backward

MODEL_KEYS = [a for a in TINY if a.startswith(('--vit_', '--llm_'))]


def keys(*args):
    return apply_config(list(args), dict(script_defaults('train_vlm.py')))


@pytest.mark.parametrize('modes', [[], ['--llm_mode=lora', '--vision_mode=lora'],
                                   ['--vision_mode=frozen', '--llm_mode=frozen']])
def test_the_meta_trace_keeps_what_a_cpu_step_keeps_for_backward(modes):
    """The plan's activations, traced on the meta device (attention as the flash kernels keep it), are byte for
    byte the tensors a real fp32 step on the CPU (SDPA's flash kernel) saves for backward."""
    model = plan_model(keys(*MODEL_KEYS, *modes))[0]
    real = copy.deepcopy(model).to_empty(device='cpu')
    with torch.device('meta'):
        traced = saved_for_backward(model, 2, 64, torch.float32)
    assert traced == saved_for_backward(real, 2, 64, torch.float32)
    assert traced['llm_blocks'][0] > 0 and (traced['vision'] > 0) == ('--vision_mode=frozen' not in modes)


def test_the_plan_of_a_recipe_whose_models_are_not_on_disk():
    """config/groundcap.py: DINOv2-large and Gemma-2-2B from their known architectures (parameter counts as the
    model cards give them); frozen towers, a trained bridge. FSDP divides what is sharded by the GPUs and keeps the
    gathered units; DDP on several GPUs keeps its gradient buckets besides the gradients."""
    p = plan(keys('config/groundcap.py'))
    assert abs(p['parts']['llm'] - 2.614e9) < 1e6 and abs(p['parts']['vision_tower'] - 0.3035e9) < 1e6
    assert p['trained'] == p['parts']['connector'] and p['dtype'] == 'bfloat16'
    rows = {(r['strategy'], r['gpus']): r for r in p['rows']}
    trained = p['trained']
    assert rows['DDP', 1]['grads'] == 4 * trained and rows['DDP', 8]['grads'] == 8 * trained
    assert rows['DDP', 8]['optim'] == 8 * trained and rows['FSDP', 8]['optim'] == trained
    # DDP: fp32 weights, and bf16 copies of the frozen LLM's weights that autocast keeps for its backward
    assert rows['DDP', 4]['weights'] == 4 * p['params'] + p['autocast_copies'] > 4 * p['params'] + 4.5 * GiB
    assert rows['FSDP', 8]['weights'] < rows['FSDP', 4]['weights'] < rows['DDP', 4]['weights'] / 3
    for r in p['rows']:
        assert r['total'] == r['weights'] + r['grads'] + r['optim'] + r['activations']
        assert r['fits'] == [b >= 8 for b in r['max_batch']]  # the config's batch: 8


def test_bench_plan_prints_the_table_and_refuses_fsdp_for_qlora():
    p = run([sys.executable, 'bench.py', 'config/cifar10_vlm.py', '--plan'])
    rows = re.findall(r'^(DDP|FSDP) +(\d) GPUs? +(.*)$', p.stdout, re.M)
    assert [(s, n) for s, n, _ in rows] == [(s, n) for s in ('DDP', 'FSDP') for n in '148']
    assert all(r.startswith('refused: fsdp does not shard QLoRA') for s, _, r in rows if s == 'FSDP')
    assert 'the ViT config/cifar10_siglip.py trains' in p.stdout  # vision= names a run not trained yet
