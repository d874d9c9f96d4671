import math


def test_weight_decay_spares_positions_and_class_and_register_tokens():
    """A DINOv2-style tower (class token, registers) training in full: only weight matrices decay."""
    from model import VLM, ConnectorConfig, DecoderConfig, ViTConfig, VLMConfig
    from optim import make_optimizer
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

    from optim import make_optimizer
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

    from optim import make_optimizer, set_lr
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


def test_muon_matches_torch_optim_muon():
    """optim.Muon (its Newton-Schulz in float64) against PyTorch's own (torch.optim.Muon, in bf16; the same
    AdamW-matched step size): ten steps with Nesterov momentum and weight decay land on the same weights."""
    import copy

    import pytest
    import torch

    from optim import Muon
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
