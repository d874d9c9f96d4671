import re
import sys

from conftest import TINY, run


def test_bench_reports_speed_mfu_and_memory(shapes_dir):
    p = run([sys.executable, 'bench.py', f'--data_dir={shapes_dir}', *TINY, '--batch_size=8', '--bench_iters=3',
             '--bench_warmup=1', '--isolate_turns=True'])
    line = p.stdout.strip().splitlines()[-1]
    tok_s = float(re.search(r'(\d+) text tok/s', line).group(1))
    gflops = float(re.search(r'([\d.]+) GFLOP/s, MFU ([\d.]+)%', line).group(1))
    assert tok_s > 0 and gflops > 0 and 'MiB peak' in line
    assert 'median of 3' in line
