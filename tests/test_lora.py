import copy
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import TINY, run
from checkpoint import from_checkpoint, load_checkpoint, tokenizer_from_state
from lora import apply_lora, lora_modules, merge_lora
from model import VLM, ConnectorConfig, DecoderConfig, ViTConfig, VLMConfig
from optim import make_optimizer


def tiny_vlm(seed=0):
    torch.manual_seed(seed)
    return VLM(VLMConfig(vision=ViTConfig(image_size=16, patch_size=4, n_layer=1, n_head=2, n_embd=32),
                         connector=ConnectorConfig(in_dim=32, out_dim=32),
                         llm=DecoderConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                           intermediate_size=64)))


def tiny_batch(model, B=3, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    n_img = model.num_image_tokens
    ids = torch.randint(10, 50, (B, T + n_img), generator=g)
    ids[:, 1:1 + n_img] = model.cfg.image_token_id
    images = torch.randint(0, 256, (B, 16, 16, 3), dtype=torch.uint8, generator=g)
    targets = torch.where(torch.arange(T + n_img) > n_img, torch.roll(ids, -1, 1), -100)
    return dict(input_ids=ids, images=images, targets=targets)


def randomize_B(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_fresh_lora_equals_base_and_merge_unmerge_round_trip():
    model = tiny_vlm().eval()
    batch = tiny_batch(model)
    ref = model(batch['input_ids'], batch['images'])
    base = copy.deepcopy(model.state_dict())
    wrapped = apply_lora(model.llm, r=4, alpha=8) + apply_lora(model.vision_tower, r=4, alpha=8, rslora=True)
    assert len(wrapped) == 2 * 7 + 4  # q k v o gate up down per decoder block; qkv proj fc1 fc2 in the ViT
    assert not any('lm_head' in n or 'embed' in n for n in wrapped)
    torch.testing.assert_close(model(batch['input_ids'], batch['images']), ref, rtol=0, atol=0)

    randomize_B(model)
    adapted = model(batch['input_ids'], batch['images'])
    assert (adapted - ref).abs().max() > 1e-3  # the adapters now do something
    for m in lora_modules(model):
        m.merge()
    torch.testing.assert_close(model(batch['input_ids'], batch['images']), adapted, rtol=1e-5, atol=1e-5)
    for m in lora_modules(model):
        m.unmerge()
    torch.testing.assert_close(model(batch['input_ids'], batch['images']), adapted, rtol=1e-5, atol=1e-5)
    for name, v in model.state_dict().items():
        if 'lora_' not in name:
            torch.testing.assert_close(v, base[name.replace('.base.', '.')], rtol=0, atol=1e-6)


def test_training_moves_only_adapters_and_grad_checkpointing_reaches_them():
    model = tiny_vlm()
    model.vision_tower.requires_grad_(False)
    apply_lora(model.llm, r=4, alpha=8, dropout=0.0)  # embeddings frozen with the rest of the LLM
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all('lora_' in n or n.startswith('connector') for n in trainable)

    # the same gradients with and without recomputing the decoder blocks, from text alone (no trainable
    # input: non-reentrant checkpointing must still reach the adapters)
    randomize_B(model)
    batch = tiny_batch(model)
    text = dict(input_ids=torch.where(batch['targets'] == -100, 11, batch['input_ids']), targets=batch['targets'])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.llm.grad_checkpointing = ckpt
        model(**text).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if 'lora_' in n})
    assert all(g.abs().sum() > 0 for g in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)

    opt = make_optimizer(model, 1e-2, 0.0, (0.9, 0.95), 'cpu')
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        opt.zero_grad()
        model(**batch).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, before[n]), n


def relative_error(a, b):
    return float((a - b).norm() / b.norm()) if not a.requires_grad else relative_error(a.detach(), b.detach())


@pytest.mark.parametrize('quant_type', ['nf4', 'fp4'])
def test_qlora_forward_close_to_full_precision_and_trains_on_cpu(quant_type):
    model = tiny_vlm().eval()
    # embeddings (and the tied head) of a pretrained model's scale, so a frozen head can express a fit
    model.llm.embed_tokens.weight.data.normal_(std=1.0)
    batch = tiny_batch(model)
    ref = model(batch['input_ids'], batch['images'])
    apply_lora(model.llm, r=4, alpha=8, quantize=quant_type, double_quant=True, dropout=0.0)
    assert all(type(m.base).__name__ == 'Linear4bit' for m in lora_modules(model))
    assert type(model.llm.lm_head) is nn.Linear and type(model.connector.mlp.fc1) is nn.Linear
    err = relative_error(model(batch['input_ids'], batch['images']), ref)
    print(f'QLoRA {quant_type} forward relative error vs fp32 (tiny random model): {err:.4f}')
    assert 0 < err < 0.2

    model.train()
    opt = make_optimizer(model, 3e-2, 0.0, (0.9, 0.95), 'cpu')
    n_sup = int((batch['targets'] != -100).sum())
    losses = []
    for _ in range(20):  # fit one batch: the adapters and connector must be able to lower the loss
        opt.zero_grad()
        loss = model(**batch) / n_sup
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    with pytest.raises(ValueError, match='4-bit base'):
        lora_modules(model)[0].merge()
    lora_modules(model)[0].dequantize()
    lora_modules(model)[0].merge()  # possible once dequantised


def test_apply_lora_on_hf_llama_and_gpt2():
    transformers = pytest.importorskip('transformers')
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                 n_positions=32, bos_token_id=0,
                                                                 eos_token_id=0)).eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    for model, per_layer in ((llama, 7), (gpt2, 4)):  # q k v o gate up down; c_attn c_proj c_fc c_proj
        ref = model(ids).logits
        wrapped = apply_lora(model, r=4, alpha=8)
        assert len(wrapped) == 2 * per_layer and not any('lm_head' in n for n in wrapped)
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
        randomize_B(model)
        adapted = model(ids).logits
        merge_lora(model)
        assert not lora_modules(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    # QLoRA over GPT-2's Conv1D (weights stored transposed)
    gpt2_q = transformers.GPT2LMHeadModel(gpt2.config).eval()
    ref = gpt2_q(ids).logits
    apply_lora(gpt2_q, r=4, alpha=8, quantize='nf4')
    assert relative_error(gpt2_q(ids).logits, ref) < 0.2


def test_per_component_learning_rates_and_adamw8bit_refused_on_cpu():
    model = tiny_vlm()
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 'cpu', lr_scales={'llm': 0.1})
    lr_of = {id(p): g['lr'] for g in opt.param_groups for p in g['params']}
    for n, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(1e-4 if n.startswith('llm') else 1e-3), n
    with pytest.raises(SystemExit, match='needs CUDA'):
        make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 'cpu', optimizer='adamw8bit')


def train(shapes_dir, out_dir, *extra):
    return run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={out_dir}', *TINY,
                '--batch_size=16', '--learning_rate=3e-3', '--warmup_iters=2', '--test_at_end=False', *extra])


def train_losses(out_dir):
    lines = [json.loads(l) for l in open(os.path.join(out_dir, 'metrics.jsonl'))]
    return {m['iter']: m['loss'] for m in lines if 'loss' in m}


def test_lora_and_qlora_runs_learn_save_adapters_only_resume_and_merge(shapes_dir, tiny_run, tmp_path):
    # adapters on a briefly trained model (a random one's frozen head cannot express a fit), fitting 16
    # samples: they must do better than the connector alone over the frozen model
    out, frozen = tmp_path / 'lora', tmp_path / 'frozen'
    common = [f'--init_from={tiny_run}', '--max_samples=16', '--max_iters=20', '--eval_interval=10', '--log_interval=5',
              '--learning_rate=1e-2', '--min_lr=1e-2', '--lora_r=4', '--lora_dropout=0.0']
    p = train(shapes_dir, out, '--llm_mode=lora', '--vision_mode=lora', '--grad_checkpointing=True', *common)
    assert 'LoRA r=4: wrapped 14 modules of Decoder' in p.stdout and 'wrapped 4 modules of VisionTower' in p.stdout
    train(shapes_dir, frozen, '--llm_mode=frozen', '--vision_mode=frozen', *common)
    p = train(shapes_dir, tmp_path / 'qlora', '--llm_mode=qlora', '--vision_mode=frozen', *common)
    assert 'QLoRA (nf4) r=4: wrapped 14 modules of Decoder' in p.stdout
    losses, frozen_losses, qlora_losses = train_losses(out), train_losses(frozen), train_losses(tmp_path / 'qlora')
    for run_losses in (losses, qlora_losses):
        assert run_losses[20] < run_losses[5] - 0.03 and run_losses[20] < frozen_losses[20] - 0.03, \
            (losses, qlora_losses, frozen_losses)
    qlora_ckpt = load_checkpoint(tmp_path / 'qlora' / 'ckpt.pt')
    assert all('lora_' in k or k.startswith('connector') for k in qlora_ckpt['model']), list(qlora_ckpt['model'])
    with pytest.raises(SystemExit, match='--dequantize'):
        merge_lora(from_checkpoint(qlora_ckpt, 'cpu'))
    assert not lora_modules(merge_lora(from_checkpoint(qlora_ckpt, 'cpu'), dequantize=True))

    ckpt = load_checkpoint(out / 'ckpt.pt')
    assert all('lora_' in k or k.startswith('connector') for k in ckpt['model']), list(ckpt['model'])
    full_size, lora_size = os.path.getsize(os.path.join(tiny_run, 'ckpt.pt')), os.path.getsize(out / 'ckpt.pt')
    print(f'tiny model checkpoint: full {full_size / 1e3:.0f} kB, LoRA r=4 {lora_size / 1e3:.0f} kB')
    assert lora_size < 0.6 * full_size

    # resume goes on from the adapters; the base is rebuilt and checked
    train(shapes_dir, out, '--llm_mode=lora', '--vision_mode=lora', *common[1:], '--max_iters=22', '--eval_interval=11',
          '--init_from=resume')
    assert load_checkpoint(out / 'ckpt.pt')['iter_num'] == 22

    # a rebuilt base with other weights is refused, naming the problem
    bad = dict(load_checkpoint(out / 'ckpt.pt'))
    bad['base'] = dict(bad['base'], checksum=bad['base']['checksum'] * 1.01)
    with pytest.raises(SystemExit, match='right shapes but other values'):
        from_checkpoint(bad, 'cpu')
    bad['config'] = dict(bad['config'], lora_r=8)
    with pytest.raises(SystemExit):
        from_checkpoint(dict(load_checkpoint(out / 'ckpt.pt'), config=bad['config']), 'cpu')

    # merged export: plain weights, same answers as base + adapters
    run([sys.executable, 'checkpoint.py', 'merge', str(out), str(tmp_path / 'merged')])
    merged = load_checkpoint(tmp_path / 'merged' / 'ckpt.pt')
    assert not any('lora_' in k for k in merged['model'])
    images = np.array(np.load(os.path.join(shapes_dir, 'images.npy'), mmap_mode='r')[:4])
    tok = tokenizer_from_state(ckpt['tokenizer'])
    a = from_checkpoint(load_checkpoint(out / 'ckpt.pt'), 'cpu').eval().chat(tok, images, ['how many shapes?'] * 4)
    b = from_checkpoint(merged, 'cpu').eval().chat(tok, images, ['how many shapes?'] * 4)
    assert a == b
    # classify.py takes a LoRA run (base + adapters) and scores as the merged export does
    import classify
    scored = [classify.predict_batch(classify.load_model(out_dir=str(d), device='cpu', dtype='float32'), list(images),
                                     ['circle', 'square', 'triangle']) for d in (out, tmp_path / 'merged')]
    assert [x[0] for x in scored[0]] == [x[0] for x in scored[1]]
    assert np.allclose([x[1] for x in scored[0]], [x[1] for x in scored[1]], atol=1e-4)


def test_qlora_quantises_on_the_cpu_before_the_model_moves_to_the_gpu(monkeypatch):
    """A 7B base in fp32 is 28 GB: QLoRA's point, a 24 GB card, needs the quantisation done before the move. The
    model's move to 'cuda' is recorded (and skipped, on this CPU): by then every targeted layer is 4-bit, and no
    full-precision weight of those layers is left on the model."""
    from checkpoint import ModelSpec, build_model
    from lora import is_4bit, lora_modules
    from model import VLM
    moves = []

    def record(self, *args, **kwargs):
        mods = lora_modules(self.llm)
        moves.append((args, len(mods), all(is_4bit(m.base) for m in mods)))
        return self
    monkeypatch.setattr(VLM, 'to', record)
    spec = ModelSpec(vit_layers=1, vit_width=32, vit_heads=2, llm_layers=2, llm_width=64, llm_heads=4, llm_kv_heads=2,
                     llm_mlp_width=128, llm_mode='qlora', dtype='float32')
    model = build_model(spec, 'cuda', ['<image>\nwhat color is it?', 'red'])[0]
    assert moves == [(('cuda',), 14, True)]  # 2 blocks x (q, k, v, o, gate, up, down), moved once
    assert not any(type(m) is torch.nn.Linear for name, m in model.llm.named_modules() if name.endswith('proj'))
