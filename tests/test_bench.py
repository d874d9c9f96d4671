import re
import sys

from checkpoint import ModelSpec, build_model
from conftest import TINY, run
from configurator import apply_config, script_defaults
from data import VLMDataset
from test_pretrained import save_tiny


def test_bench_reports_speed_mfu_memory_and_the_attention_kernel(shapes_dir):
    """fp32 on a CPU: every attention call (1 ViT + 2 decoder layers) runs SDPA's CPU flash kernel, the causal
    training batch and the isolated turns' mask alike; bf16 autocast on a CPU picks the math kernel on purpose
    (runtime.autocast_context), and the report says so."""
    for dtype, kernel in (('float32', 'flash (CPU)'), ('bfloat16', 'math')):
        p = run([sys.executable, 'bench.py', f'--data_dir={shapes_dir}', *TINY, '--batch_size=8', '--bench_iters=3',
                 '--bench_warmup=1', '--isolate_turns=True', f'--dtype={dtype}'])
        line, kernels = p.stdout.strip().splitlines()[-2:]
        tok_s = float(re.search(r'(\d+) text tok/s', line).group(1))
        gflops = float(re.search(r'([\d.]+) GFLOP/s, MFU ([\d.]+)%', line).group(1))
        assert tok_s > 0 and gflops > 0 and 'MiB peak' in line
        assert 'median of 3' in line
        assert kernels == f'attention kernels (forward calls a step): {kernel} x3'


def test_bench_times_the_model_train_vlm_would_train(shapes_dir, tmp_path):
    """A pretrained LLM with LoRA and a frozen tower: bench.py builds what checkpoint.build_model builds for
    train_vlm.py's keys (it once timed a scratch decoder whatever llm= said)."""
    save_tiny('llama', tmp_path / 'llm')
    args = [f'--data_dir={shapes_dir}', *TINY, f'--llm={tmp_path / "llm"}', '--llm_mode=lora', '--lora_r=2',
            '--vision_mode=frozen', '--isolate_turns=True']
    p = run([sys.executable, 'bench.py', *args, '--batch_size=4', '--bench_iters=1', '--bench_warmup=1'])
    total, trained = (int(x.replace(',', '')) for x in
                      re.search(r'([\d,]+) parameters \(([\d,]+) trained', p.stdout).groups())
    config = apply_config(args, dict(script_defaults('train_vlm.py')))
    model = build_model(ModelSpec.from_config(dict(config, dtype='float32')), 'cpu',
                        VLMDataset(shapes_dir, 'train').texts())[0]
    assert model.llm.cfg.vocab_size == 300  # the tiny Llama's vocabulary, not a word vocabulary of shapes
    assert total == sum(p.numel() for p in model.parameters())
    assert trained == sum(p.numel() for p in model.parameters() if p.requires_grad) < total / 2
