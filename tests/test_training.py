import math

import torch

from training import bleu4, cider_d


def test_bleu4_hand_computed():
    assert bleu4(['the cat sat on the mat'], [['the cat sat on the mat']]) == 1.0
    # unigram 5/5, bigram 3/4, trigram 2/3, 4-gram 1/2; brevity penalty exp(1 - 6/5)
    expected = math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert math.isclose(bleu4(['the cat sat on mat'], [['the cat sat on the mat']]), expected, rel_tol=1e-12)
    # clipping: "the" counts once, and no bigram matches, so BLEU-4 is 0
    assert bleu4(['the the the the'], [['the cat']]) == 0.0
    # the reference closest in length (6 words, not 2) sets the brevity penalty; case and punctuation ignored
    assert math.isclose(bleu4(['The cat sat on the mat.'], [['a dog', 'the cat sat on the mat']]), 1.0)


def test_cider_d_hand_computed():
    # two images; "a" occurs in every image's references, so its IDF is 0. Every other n-gram has IDF log 2.
    # image 1: cosine 0.5 for unigrams ({red, square} vs {red, circle}) and bigrams, 0 for trigrams,
    # nothing for 4-grams -> 10 * (0.5 + 0.5) / 4 = 2.5. image 2 equals its reference: 10 * 3 / 4 = 7.5.
    score = cider_d(['a red square', 'a blue square'], [['a red circle'], ['a blue square']])
    assert math.isclose(score, 5.0, rel_tol=1e-12)
    # the Gaussian length penalty: a longer candidate with the same clipped matches scores lower
    longer = cider_d(['a red square and more words here', 'a blue square'], [['a red circle'], ['a blue square']])
    assert longer < score
    assert cider_d(['x y z', 'p q r'], [['a red circle'], ['a blue square']]) == 0.0


def test_reasoning_answers_are_scored_by_the_class_they_name(shapes_dir, tmp_path):
    """After classify.py --mode=convert --reasoning=True a right answer is one naming the right class, whatever
    its reasoning (an exact match of the whole 'Reasoning: ... Answer: ...' string was all but never right)."""
    from contextlib import nullcontext

    import classify
    from data import VLMDataset
    from training import qa_accuracy
    shapes = ['circle', 'square', 'triangle', 'diamond', 'cross']
    classify.convert_dataset(shapes_dir, str(tmp_path / 'cls'), shapes, 'what shape is the large object?',
                             reasoning=True)
    ds = VLMDataset(str(tmp_path / 'cls'), 'val')

    class Scripted:  # reasons in its own words, then names the right class, or the next one
        def __init__(self, shift):
            self.classes, self.room = iter([shapes[(r['label'] + shift) % 5] for r in ds.records]), []

        def chat(self, tok, images, prompts, max_new_tokens):
            self.room.append(max_new_tokens)
            return [f'Reasoning: I looked closely at it. Answer: {next(self.classes)}.' for _ in prompts]

    right = Scripted(0)
    assert qa_accuracy(right, ds, None, 'cpu', nullcontext) == ({'class': 1.0, 'all': 1.0}, len(ds.records))
    assert min(right.room) > 2 * len(ds.records[0]['qa'][0]['a'].split())  # room for the whole answer
    assert qa_accuracy(Scripted(1), ds, None, 'cpu', nullcontext)[0]['all'] == 0.0


def test_weight_decay_spares_positions_and_class_and_register_tokens():
    """A DINOv2-style tower (class token, registers) training in full: only weight matrices decay."""
    from model import VLM, ConnectorConfig, DecoderConfig, ViTConfig, VLMConfig
    from training import make_optimizer
    vit = ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32, cls_token=True, n_registers=2,
                    layer_scale=1.0)
    model = VLM(VLMConfig(vit, ConnectorConfig(kind='mlp', in_dim=32, out_dim=32),
                          DecoderConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64)))
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 'cpu')
    decay = {id(p): g['weight_decay'] for g in opt.param_groups for p in g['params']}
    for n, p in model.named_parameters():
        spared = p.dim() < 2 or n.split('.')[-1] in ('pos_embed', 'cls_token', 'registers')
        assert decay[id(p)] == (0.0 if spared else 0.1), n
    assert decay[id(model.vision_tower.patch_embed.weight)] == 0.1


def _muon_toy():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 24), torch.nn.LayerNorm(24))


def test_muon_orthogonalises_hidden_matrices_and_leaves_the_rest_to_adamw():
    """optimizer='muon': the hidden matrix's first step is lr * 0.2 * sqrt(max(A, B)) times a near-orthogonal
    matrix (every singular value close to 1, whatever the gradient's spread); the embedding table, the norm
    and the bias take exactly AdamW's step."""
    import copy

    import torch

    from training import make_optimizer
    model = _muon_toy()
    ref = copy.deepcopy(model)
    x = torch.randint(0, 64, (256,))
    lr = 1e-2
    for m in (model, ref):
        (m(x) ** 2).sum().backward()
    grad = model[1].weight.grad.clone()
    before = copy.deepcopy(model.state_dict())
    opt = make_optimizer(model, lr, 0.0, (0.9, 0.95), 'cpu', 'muon')
    opt.step()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    ref_opt.step()
    for name in ('0.weight', '1.bias', '2.weight', '2.bias'):
        torch.testing.assert_close(model.state_dict()[name], ref.state_dict()[name], rtol=0, atol=1e-7)
    step = (before['1.weight'] - model[1].weight.detach()) / (lr * 0.2 * math.sqrt(24))
    s = torch.linalg.svdvals(step)
    g = torch.linalg.svdvals(grad)
    assert g.max() / g.min() > 5  # the raw gradient is far from orthogonal...
    assert 0.5 < s.min() and s.max() < 1.3  # ...its Muon step is close to it (Newton-Schulz's 5 quintic steps)


def test_muon_state_round_trips_through_a_checkpoint():
    import copy

    import torch

    from training import make_optimizer, set_lr
    x = torch.randint(0, 64, (256,))

    def steps(model, opt, n):
        for _ in range(n):
            (model(x) ** 2).sum().backward()
            opt.step()
            opt.zero_grad()

    a = _muon_toy()
    opt_a = make_optimizer(a, 1e-2, 0.1, (0.9, 0.95), 'cpu', 'muon')
    steps(a, opt_a, 2)
    b = copy.deepcopy(a)
    opt_b = make_optimizer(b, 1e-2, 0.1, (0.9, 0.95), 'cpu', 'muon')
    opt_b.load_state_dict(torch.load(_saved(opt_a.state_dict()), weights_only=True))
    steps(a, opt_a, 2)
    steps(b, opt_b, 2)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    set_lr(opt_b, 3e-3)  # the schedule, after a resume, reaches both optimizers' groups
    assert [g['lr'] for o in opt_b.optimizers for g in o.param_groups] == [3e-3] * len(opt_b.param_groups) != []
    with __import__('pytest').raises(SystemExit, match='optimizer'):
        opt_b.load_state_dict(torch.optim.AdamW(a.parameters()).state_dict())


def _saved(obj):
    import io

    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_training_curves_are_drawn_when_matplotlib_is_there_and_skipped_silently_when_not(tmp_path, monkeypatch,
                                                                                            capsys):
    import sys

    import pytest
    from PIL import Image

    from training import MetricsLogger
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


def test_muon_matches_torch_optim_muon():
    """training.Muon (its Newton-Schulz in float64) against PyTorch's own (torch.optim.Muon, in bf16; the same
    AdamW-matched step size): ten steps with Nesterov momentum and weight decay land on the same weights."""
    import copy

    import pytest
    import torch

    from training import Muon
    if not hasattr(torch.optim, 'Muon'):
        pytest.skip('torch.optim.Muon needs PyTorch 2.9 or later')
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 40) * 0.1)
    ref = copy.deepcopy(w)
    ours = Muon([w], lr=2e-2, weight_decay=0.1, ns_dtype=torch.float64)
    theirs = torch.optim.Muon([ref], lr=2e-2, weight_decay=0.1, adjust_lr_fn='match_rms_adamw')
    x, y = torch.randn(64, 40), torch.randn(64, 24)
    start = w.detach().clone()
    for _ in range(10):
        for p, opt in ((w, ours), (ref, theirs)):
            opt.zero_grad()
            (((x @ p.T).tanh() - y) ** 2).sum().backward()
            opt.step()
    moved = (w - start).norm()
    assert moved > 0.1
    assert (w - ref).norm() < 0.01 * moved  # 0.5%: torch's bf16 rounding (plain momentum instead: 1.9%)


def test_mfu_is_a_share_of_the_peak_or_not_shown():
    """MFU outside [0, 100%] means the peak is wrong: the log says so instead of printing the figure."""
    from training import mfu_text
    assert mfu_text(41.2e9, 100e9) == 'MFU 41.2%'
    assert mfu_text(100e9, 100e9) == 'MFU 100.0%'
    for bad in (150e9, -1.0):
        text = mfu_text(bad, 100e9)
        assert text.startswith('MFU n/a') and 'peak_flops' in text and '%' not in text


def test_gpu_peak_is_the_data_sheet_bf16_peak_of_the_named_device(monkeypatch):
    import training
    for name, peak in (('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA A100-SXM4-80GB', 312e12),
                       ('NVIDIA L4', 121e12), ('NVIDIA L40S', 362e12)):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None, n=name: n)
        assert training.device_peak_flops('cuda', 'bfloat16') == peak


def test_measured_peak_is_the_fastest_warm_product(monkeypatch):
    """Other work only slows a product down: the peak is the fastest timed product after the warm-ups."""
    import training
    clock = iter([0, 9, 10, 15, 20, 21, 30, 34, 40, 42])  # warm-ups 9 and 5 s, then 1, 4, 2 s
    monkeypatch.setattr(training.time, 'perf_counter', lambda: next(clock))
    assert training.measure_peak_flops('cpu', 'float32', n=64, reps=3) == 2 * 64 ** 3 / 1
