import torch


def test_mfu_is_a_share_of_the_peak_or_not_shown():
    """MFU outside [0, 100%] means the peak is wrong: the log says so instead of printing the figure."""
    from perf import mfu_text
    assert mfu_text(41.2e9, 100e9) == 'MFU 41.2%'
    assert mfu_text(100e9, 100e9) == 'MFU 100.0%'
    for bad in (150e9, -1.0):
        text = mfu_text(bad, 100e9)
        assert text.startswith('MFU n/a') and 'peak_flops' in text and '%' not in text


def test_gpu_peak_is_the_data_sheet_bf16_peak_of_the_named_device(monkeypatch):
    import perf
    for name, peak in (('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                       ('NVIDIA L4', 121e12), ('NVIDIA L40S', 362e12)):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None, n=name: n)
        assert perf.device_peak_flops('cuda', 'bfloat16') == peak


def test_measured_peak_is_the_fastest_warm_product(monkeypatch):
    """Other work only slows a product down: the peak is the fastest timed product after the warm-ups."""
    import perf
    clock = iter([0, 9, 10, 15, 20, 21, 30, 34, 40, 42])  # warm-ups 9 and 5 s, then 1, 4, 2 s
    monkeypatch.setattr(perf.time, 'perf_counter', lambda: next(clock))
    assert perf.measure_peak_flops('cpu', 'float32', n=64, reps=3) == 2 * 64 ** 3 / 1
