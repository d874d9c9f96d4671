import pytest
import torch
import torch.nn.functional as F

from data import encode_sample, pack_turns
from model import (IGNORE_INDEX, VLM, ConnectorConfig, Decoder, DecoderConfig, ViTConfig, VLMConfig, apply_rope,
                   attention_mask, left_pad, sample_next)
from tokenizer import Tokenizer

TEXTS = ['<image>\nwhat color is the circle?', 'red', 'how many objects are there?', 'two',
         'describe the image.', 'a large red circle at the top left and a small blue square at the center.']


def tiny_vlm(connector='pixel_shuffle', tok=None, seed=0):
    torch.manual_seed(seed)
    tok = tok or Tokenizer.build('word', TEXTS)
    cfg = VLMConfig(ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32),
                    ConnectorConfig(kind=connector, in_dim=32, out_dim=48, scale_factor=2),
                    DecoderConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=48,
                                  intermediate_size=96),
                    image_token_id=tok.image_token_id)
    return VLM(cfg).eval(), tok


def images(b, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size, 3), generator=g, dtype=torch.uint8)


def conversation(answer_first='red'):
    return [{'role': 'user', 'content': TEXTS[0]}, {'role': 'assistant', 'content': answer_first},
            {'role': 'user', 'content': TEXTS[4]}, {'role': 'assistant', 'content': TEXTS[5]}]


@pytest.mark.parametrize('connector,n_tokens', [('mlp', 16), ('pixel_shuffle', 4)])
def test_shapes(connector, n_tokens):
    model, tok = tiny_vlm(connector)
    assert model.num_image_tokens == n_tokens
    ids, _ = tok.encode_chat(conversation(), n_tokens)
    logits = model(torch.tensor([ids, ids]), images(2))
    assert logits.shape == (2, len(ids), tok.vocab_size)
    assert model.image_embeddings(images(2)).shape == (2, n_tokens, 48)


def test_loss_is_cross_entropy_over_exactly_the_answer_positions():
    model, tok = tiny_vlm()
    n = model.num_image_tokens
    convs = [conversation('red'), conversation('two')[:2]]  # different answer lengths, padded batch
    encoded = [encode_sample(tok, c, n, 512) for c in convs]
    T = max(len(e[0]) for e in encoded)
    input_ids = torch.full((2, T), tok.pad_id)
    targets = torch.full((2, T), IGNORE_INDEX)
    mask = torch.zeros((2, T), dtype=torch.bool)
    for b, (ids, tg, *_) in enumerate(encoded):
        input_ids[b, :len(ids)], targets[b, :len(ids)], mask[b, :len(ids)] = torch.tensor(ids), torch.tensor(tg), True
    imgs = images(2)
    loss_sum = model(input_ids, imgs, mask, targets)
    # independently: find every token between <|assistant|> and its <|end|> (inclusive) and score
    # its prediction from the previous position
    logits = model(input_ids, imgs, mask).float()
    expected, count = 0.0, 0
    for b in range(2):
        inside = False
        for i in range(1, int(mask[b].sum())):
            tok_id = int(input_ids[b, i])
            if inside:
                expected += F.cross_entropy(logits[b, i - 1], input_ids[b, i], reduction='sum')
                count += 1
                inside = tok_id != tok.eot_id
            if tok_id == tok.assistant_id:
                inside = True
    assert count == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)


def test_an_unknown_connector_names_every_choice():
    from model import build_connector
    with pytest.raises(ValueError, match="'mlp', 'pixel_shuffle', 'pixel_shuffle_linear' or 'bridge'"):
        build_connector(ConnectorConfig(kind='perceiver'))


@pytest.mark.parametrize('connector', ['mlp', 'pixel_shuffle'])
def test_connector_norm_puts_image_tokens_at_the_embedding_scale(connector):
    """out_norm: every image token's RMS is the LLM's mean token-embedding RMS at the start, however large
    the projector's weights are (here scaled 100x), and the gain trains; the bridge and SmolVLM's linear
    projector refuse it by name."""
    from model import build_connector
    torch.manual_seed(0)
    tok = Tokenizer.build('word', TEXTS)
    cfg = VLMConfig(ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32),
                    ConnectorConfig(kind=connector, in_dim=32, out_dim=48, scale_factor=2, out_norm=True),
                    DecoderConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=4, n_kv_head=2, n_embd=48,
                                  intermediate_size=96), image_token_id=tok.image_token_id)
    model = VLM(cfg)
    want = model.llm.embed_tokens.weight.pow(2).mean(-1).sqrt().mean()
    with torch.no_grad():
        for p in model.connector.parameters():
            if p.dim() == 2:
                p.mul_(100)
    e = model.image_embeddings(images(2))
    torch.testing.assert_close(e.pow(2).mean(-1).sqrt(), want.expand(e.shape[:2]), rtol=1e-4, atol=0)
    e.sum().backward()
    assert model.connector.mlp.norm.weight.grad is not None if connector == 'pixel_shuffle' else \
        model.connector.norm.weight.grad is not None
    for kind in ('bridge', 'pixel_shuffle_linear'):
        with pytest.raises(ValueError, match=f"out_norm ends the MLP projector: .* not '{kind}'"):
            build_connector(ConnectorConfig(kind=kind, out_norm=True))


def test_unmasked_causal_training_path_equals_the_masked_reference():
    """A right-padded training batch runs without a mask (is_causal, grouped-query heads shared in the kernel):
    its loss and every gradient equal those of the explicit causal-and-padding mask with K and V repeated."""
    model, tok = tiny_vlm()
    model.train()
    n = model.num_image_tokens
    encoded = [encode_sample(tok, c, n, 512) for c in (conversation('red'), conversation('two')[:2])]
    T = max(len(e[0]) for e in encoded)
    ids, targets = torch.full((2, T), tok.pad_id), torch.full((2, T), IGNORE_INDEX)
    mask = torch.zeros((2, T), dtype=torch.bool)
    for b, (i, t, *_) in enumerate(encoded):
        ids[b, :len(i)], targets[b, :len(i)], mask[b, :len(i)] = torch.tensor(i), torch.tensor(t), True
    imgs = images(2)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    fast = model(ids, imgs, mask, targets)  # the training path
    fast_grads = grads(fast)

    def reference_attention(self, x, cos, sin, m, cache=None):  # the explicit mask, K and V repeated per head
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_head // self.n_kv_head
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                           attn_mask=attention_mask(mask, T))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    from unittest import mock
    from model import Attention
    with mock.patch.object(Attention, 'forward', reference_attention):
        ref = model(ids, imgs, mask, targets)
        ref_grads = grads(ref)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(fast_grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


def test_placeholder_count_must_match_image_embeddings():
    model, tok = tiny_vlm()
    ids, _ = tok.encode_chat(conversation(), model.num_image_tokens + 1)
    with pytest.raises(ValueError, match='placeholders'):
        model(torch.tensor([ids]), images(1))


def test_left_padding_changes_nothing_and_makes_no_nan():
    model, tok = tiny_vlm()
    ids, _ = tok.encode_chat(conversation()[:1], model.num_image_tokens, add_generation_prompt=True)
    short, _ = tok.encode_chat([{'role': 'user', 'content': '<image>\nred'}], model.num_image_tokens, True)
    batch, mask = left_pad([ids, short], tok.pad_id)
    out = model(batch, images(2), mask)
    assert torch.isfinite(out).all()  # padding rows attend to themselves only
    alone = model(torch.tensor([short]), images(2)[1:])
    torch.testing.assert_close(out[1, -1], alone[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('temperature', [0.0, 0.9])
def test_kv_cache_generation_equals_recomputation(temperature):
    model, tok = tiny_vlm()
    prompts = [tok.encode_chat(conversation()[:k], model.num_image_tokens, True)[0] for k in (1, 3)]
    ids, mask = left_pad(prompts, tok.pad_id)
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(0)
        outs.append(model.generate(ids, images(2), mask, max_new_tokens=12, temperature=temperature, top_k=20,
                                   use_cache=use_cache, generator=g))
    assert outs[0].shape[1] == 12
    assert torch.equal(outs[0], outs[1])


def test_generation_stops_at_end_of_turn():
    model, tok = tiny_vlm()
    prompt = tok.encode_chat(conversation()[:1], model.num_image_tokens, True)[0]
    ids, mask = left_pad([prompt, prompt], tok.pad_id)

    class ScriptedHead(torch.nn.Module):  # row 0 says <|end|> at step 2, row 1 at step 3
        step = 0

        def forward(self, h):
            self.step += 1
            logits = torch.zeros(h.shape[0], tok.vocab_size)
            logits[:, 9] = 1.0
            logits[0, tok.eot_id] = 2.0 * (self.step >= 2)
            logits[1, tok.eot_id] = 2.0 * (self.step >= 3)
            return logits

    model.llm.lm_head = ScriptedHead()
    out = model.generate(ids, images(2), mask, max_new_tokens=10, eos_id=tok.eot_id)
    assert out.tolist() == [[9, tok.eot_id, tok.eot_id], [9, 9, tok.eot_id]]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits).tolist() == [1, 0]
    assert sample_next(logits, 1.0, top_k=1, generator=g).tolist() == [1, 0]
    assert sample_next(logits, 1.0, top_p=0.01, generator=g).tolist() == [1, 0]
    draws = torch.stack([sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}


def test_attention_mask_is_causal_and_hides_padding():
    valid = torch.tensor([[False, True, True]])
    m = attention_mask(valid, 3)[0, 0]
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_decoder_matches_transformers_llama():
    transformers = pytest.importorskip('transformers')
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=128)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ours = Decoder(DecoderConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=48, intermediate_size=96,
                                 tie_embeddings=False)).eval()
    sd = {k.removeprefix('model.'): v for k, v in ref.state_dict().items() if 'rotary' not in k}
    ours.load_state_dict(sd)
    ids = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        expected = ref(ids).logits
        pos = torch.arange(17).expand(2, 17)
        got = ours.lm_head(ours(ours.embed_tokens(ids), pos, torch.ones(2, 17, dtype=torch.bool)))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def packed_loss(model, tok, turns, img):
    """(summed loss, ids, targets, positions, segment ids) of a conversation packed with isolated turns."""
    ids, tg, pos, seg, _ = encode_sample(tok, turns, model.num_image_tokens, 512, isolate_turns=True)
    loss = model(torch.tensor([ids]), img, targets=torch.tensor([tg]), positions=torch.tensor([pos]),
                 segment_ids=torch.tensor([seg]))
    return loss, ids, tg, pos, seg


def alone_loss(model, tok, turns, img):
    """(summed loss, encoding) of one conversation in its own sequence."""
    one = encode_sample(tok, turns, model.num_image_tokens, 512)
    return model(torch.tensor([one[0]]), img, targets=torch.tensor([one[1]])), one


@torch.no_grad()
def test_isolated_turns_score_each_answer_as_if_asked_alone():
    """Packed (shared image prefix, one segment per question) == each question in its own sequence."""
    model, tok = tiny_vlm()
    n = model.num_image_tokens
    turns = conversation('red') + [{'role': 'user', 'content': TEXTS[2]}, {'role': 'assistant', 'content': 'two'}]
    img = images(1)
    packed, ids, tg, pos, seg = packed_loss(model, tok, turns, img)
    alone = 0.0
    for k in range(0, len(turns), 2):
        q = turns[k]['content'] if k == 0 else '<image>\n' + turns[k]['content']
        alone = alone + alone_loss(model, tok, [{'role': 'user', 'content': q}, turns[k + 1]], img)[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # without isolation the later answers see the earlier ones, and the loss differs
    chained = encode_sample(tok, turns, n, 512)
    assert abs(float(model(torch.tensor([chained[0]]), img, targets=torch.tensor([chained[1]]))) - float(alone)) > 1e-4
    assert sum(t != -100 for t in tg) == sum(t != -100 for t in chained[1])
    assert pack_turns(tok, turns, n, True)[0].count(tok.image_token_id) == n  # the image once


@pytest.mark.parametrize('head, lead', [([], 'look at this: '),
                                        ([{'role': 'system', 'content': 'answer in one word.'}], '')])
@torch.no_grad()
def test_isolated_turns_with_a_system_turn_or_text_before_the_image(head, lead):
    """Each pair, packed, scores as it would alone: after the system turn, and after the first turn's text up
    to the image (before, a leading system turn paired the turns wrongly and the text moved later positions)."""
    model, tok = tiny_vlm()
    qa = conversation('red') + [{'role': 'user', 'content': TEXTS[2]}, {'role': 'assistant', 'content': 'two'}]
    turns = head + [dict(qa[0], content=lead + qa[0]['content'])] + qa[1:]
    img = images(1)
    packed, ids, tg, pos, seg = packed_loss(model, tok, turns, img)
    alone = 0.0
    for k in range(0, len(qa), 2):
        q = lead + qa[k]['content'] if k == 0 else lead + '<image>\n' + qa[k]['content']
        loss, one = alone_loss(model, tok, head + [{'role': 'user', 'content': q}, qa[k + 1]], img)
        alone = alone + loss
        mine = [i for i, s in enumerate(seg) if s == k // 2 + 1]  # the pair's own tokens: as alone, same positions
        assert [ids[i] for i in mine] == one[0][-len(mine):] and [pos[i] for i in mine] == one[2][-len(mine):]
    torch.testing.assert_close(packed, alone, rtol=1e-6, atol=1e-5)
    assert sum(t != IGNORE_INDEX for t in tg) == sum(len(tok.encode(t['content'])) + 1 for t in qa[1::2])


def open_bridge_gates(model, value=0.5):
    with torch.no_grad():
        model.connector.gate_attn.fill_(value)
        model.connector.gate_ff.fill_(value)


def test_bridge_starts_as_the_identity_and_then_sees_the_image():
    model, tok = tiny_vlm('bridge')
    assert model.num_image_tokens == 0
    ids, sup = tok.encode_chat(conversation(), model.num_image_tokens)
    assert tok.image_token_id not in ids and any(sup)
    ids = torch.tensor([ids, ids])
    text_only = model(ids)
    assert torch.equal(model(ids, images(2)), text_only)  # gates at 0: the LLM sees its own embeddings
    open_bridge_gates(model)
    seen = model(ids, images(2))
    assert not torch.allclose(seen, text_only) and not torch.allclose(seen[0], seen[1])


def test_bridge_kv_cache_generation_equals_recomputation():
    model, tok = tiny_vlm('bridge')
    open_bridge_gates(model)
    prompts = [tok.encode_chat(conversation()[:k], model.num_image_tokens, True)[0] for k in (1, 3)]
    ids, mask = left_pad(prompts, tok.pad_id)
    # sampled, so that every step's distribution counts (greedy tiny models repeat one token)
    outs = [model.generate(ids, images(2), mask, max_new_tokens=10, use_cache=c, temperature=1.0,
                           generator=torch.Generator().manual_seed(0)) for c in (True, False)]
    assert torch.equal(outs[0], outs[1])
    assert len(set(outs[0].flatten().tolist())) > 2


@pytest.mark.parametrize('vision_mode,llm_mode,connector', [
    ('full', 'full', 'pixel_shuffle'), ('full', 'frozen', 'pixel_shuffle'), ('frozen', 'frozen', 'pixel_shuffle'),
    ('frozen', 'lora', 'pixel_shuffle'), ('lora', 'lora', 'pixel_shuffle'), ('frozen', 'frozen', 'bridge'),
    ('frozen', 'full', 'bridge'), ('full', 'full', 'pixel_shuffle_linear')])
def test_training_flops_match_a_flop_counter(vision_mode, llm_mode, connector):
    """The MFU numerator: the formula against torch's own count of the matmuls of a training forward (the LM
    head only where there is a loss) and backward, for each mode: frozen parts and LoRA bases skip their weight
    gradients, a frozen tower its whole backward, and the adapters train in full."""
    from torch.utils.flop_counter import FlopCounterMode
    from lora import apply_lora
    torch.manual_seed(0)
    tok = Tokenizer.build('word', TEXTS)
    cfg = VLMConfig(ViTConfig(image_size=32, patch_size=8, n_layer=2, n_head=2, n_embd=64),
                    ConnectorConfig(kind=connector, in_dim=64, out_dim=128, scale_factor=2, n_head=4),
                    DecoderConfig(vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,  # a head worth counting
                                  intermediate_size=384),
                    image_token_id=tok.image_token_id)
    model = VLM(cfg)
    for part, mode in ((model.vision_tower, vision_mode), (model.llm, llm_mode)):
        if mode == 'lora':
            apply_lora(part, r=8, verbose=False)
        part.requires_grad_(mode == 'full') if mode != 'lora' else None
    lora = [sum(p.numel() for n, p in part.named_parameters() if 'lora_' in n)
            for part in (model.vision_tower, model.llm)]
    ids, sup = tok.encode_chat(conversation(), model.num_image_tokens)
    targets = torch.tensor([[t if s else IGNORE_INDEX for t, s in zip(ids[1:], sup[1:])] + [IGNORE_INDEX]] * 2)
    n_sup = int((targets[0] != IGNORE_INDEX).sum())
    with FlopCounterMode(display=False) as counter:
        model(torch.tensor([ids, ids]), images(2), targets=targets).backward()
    formula = 2 * cfg.training_flops_per_sample(len(ids) - model.num_image_tokens, model.num_image_tokens,
                                                vision_mode, llm_mode, n_supervised=n_sup, lora_params=lora)
    assert formula == pytest.approx(counter.get_total_flops(), rel=0.05)


class _Records:  # the part of a VLMDataset that collate reads
    def __init__(self, records, imgs):
        self.records, self.images = records, imgs


@pytest.mark.parametrize('isolate', [False, True])
def test_packed_samples_give_the_unpacked_loss_and_gradients(isolate):
    """Whole samples packed into shared rows (positions from 0 each, no attention across samples, one image
    per sample) train exactly as the right-padded batch of the same samples: summed loss and every gradient."""
    from data import collate, pack_rows
    model, tok = tiny_vlm()
    model.train()
    qa = [('what color is the circle?', 'red'), ('how many objects are there?', 'two'),
          ('describe the image.', TEXTS[5])]
    records = []
    for k in range(5):  # 2 to 6 turns: lengths that pack unevenly
        turns = []
        for j in range(1 + k % 3):
            q, a = qa[(k + j) % 3]
            turns += [{'role': 'user', 'content': ('<image>\n' if j == 0 else '') + q}, {'role': 'assistant', 'content': a}]
        records.append({'turns': turns, 'image': 4 - k})
    data = _Records(records, images(5).numpy())
    losses, grads, rows = [], [], []
    for pack in (False, True):
        batch = collate(data, list(range(5)), tok, model.num_image_tokens, 64, isolate_turns=isolate, pack=pack)
        rows.append(len(batch['input_ids']))
        model.zero_grad()
        loss = model(**batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert rows[0] == 5 and rows[1] < 5  # the packing did put samples together
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]  # first fit, in order


def test_packed_samples_do_not_see_each_other():
    """Changing one packed sample's tokens leaves every other sample's logits as they were."""
    model, tok = tiny_vlm()
    n = model.num_image_tokens
    a, _ = tok.encode_chat(conversation('red'), n)
    b, _ = tok.encode_chat(conversation('two'), n)
    ids = torch.tensor([a + b])
    sample_ids = torch.tensor([[1] * len(a) + [2] * len(b)])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        both = model(ids, images(2), positions=positions, sample_ids=sample_ids)
        changed = ids.clone()
        changed[0, len(a) - 3] = tok.encode('blue')[0]  # inside the first sample's answer
        other = model(changed, images(2), positions=positions, sample_ids=sample_ids)
        alone = model(torch.tensor([b]), images(2)[1:])
    torch.testing.assert_close(other[0, len(a):], both[0, len(a):])
    torch.testing.assert_close(both[0, len(a):], alone[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[0, len(a) - 2:len(a)], both[0, len(a) - 2:len(a)])


def _flex_batch(isolate, pack, tok, n_img, device='cpu'):
    from data import collate
    turns = conversation('red') + [{'role': 'user', 'content': TEXTS[2]}, {'role': 'assistant', 'content': 'two'}]
    data = _Records([{'turns': turns[:2 + 2 * (k % 3)], 'image': k} for k in range(4)], images(4).numpy())
    batch = collate(data, list(range(4)), tok, n_img, 80, isolate_turns=isolate, pack=pack)
    return {k: v.to(device) for k, v in batch.items()}


@pytest.mark.parametrize('isolate,pack', [(True, False), (False, True), (True, True)])
@torch.no_grad()
def test_flex_attention_equals_the_masked_reference(monkeypatch, isolate, pack):
    """attention='flex' (a BlockMask of the same rule) gives the boolean-mask path's logits at every real token
    and its loss. Forward only, uncompiled, on the CPU (FlexAttention has no CPU backward; the CUDA test below
    checks gradients, compiled)."""
    import model as model_module
    monkeypatch.setattr(model_module, 'compiled_flex_attention', lambda: model_module.flex_attention)
    model, tok = tiny_vlm()
    batch = _flex_batch(isolate, pack, tok, model.num_image_tokens)
    inputs = {k: v for k, v in batch.items() if k != 'targets'}
    out = []
    for attention in ('sdpa', 'flex'):
        model.llm.attention = attention
        out.append((model(**inputs)[batch['attention_mask']], model(**batch)))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='FlexAttention trains on CUDA (no CPU backward)')
@pytest.mark.parametrize('isolate,pack', [(True, False), (True, True)])
def test_compiled_flex_attention_trains_as_the_masked_reference_on_cuda(isolate, pack):
    model, tok = tiny_vlm()
    model = model.cuda().train()
    batch = _flex_batch(isolate, pack, tok, model.num_image_tokens, 'cuda')
    out = []
    for attention in ('sdpa', 'flex'):
        model.llm.attention = attention
        model.zero_grad()
        loss = model(**batch)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-4)
    for n, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][n], g, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='the flash kernel is a CUDA kernel')
def test_training_step_runs_the_flash_kernel_on_cuda():
    """A right-padded training batch in bf16 on a GPU: every attention call (ViT and decoder) is SDPA's flash
    kernel, never the math fallback."""
    from perf import attention_kernels
    tok = Tokenizer.build('word', TEXTS)
    cfg = VLMConfig(ViTConfig(image_size=32, patch_size=8, n_layer=2, n_head=2, n_embd=128),
                    ConnectorConfig(kind='pixel_shuffle', in_dim=128, out_dim=256, scale_factor=2),
                    DecoderConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=256,
                                  intermediate_size=512), image_token_id=tok.image_token_id)
    model = VLM(cfg).cuda().train()
    ids, sup = tok.encode_chat(conversation(), model.num_image_tokens)
    targets = torch.tensor([[t if s else IGNORE_INDEX for t, s in zip(ids[1:], sup[1:])] + [IGNORE_INDEX]] * 2)

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16):
            model(torch.tensor([ids, ids]).cuda(), images(2).cuda(), targets=targets.cuda()).backward()
        torch.cuda.synchronize()
    assert attention_kernels(step) == {'flash': 4}


def test_checkpointed_decoder_compiles_and_gives_the_eager_gradients():
    """grad_checkpointing=True with compile=True: torch.compile (its aot_eager backend here, the graph capture
    and autograd split inductor also runs) traces the checkpointed blocks, and every gradient is the eager one."""
    model, tok = tiny_vlm()
    model.train()
    model.llm.grad_checkpointing = True
    ids, sup = tok.encode_chat(conversation(), model.num_image_tokens)
    targets = torch.tensor([[t if s else IGNORE_INDEX for t, s in zip(ids[1:], sup[1:])] + [IGNORE_INDEX]] * 2)
    args = (torch.tensor([ids, ids]), images(2))
    model(*args, targets=targets).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, backend='aot_eager')(*args, targets=targets).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-6)


def test_flex_attention_compiles_at_most_twice_over_twenty_batch_shapes(monkeypatch):
    """attention='flex' batches: collate pads each to max_seq_len (pad_to_max); their rows vary (packing). The
    compiled FlexAttention must not compile again for each shape: past dynamo's recompile limit it runs the eager
    reference, which materialises the whole score matrix. aot_eager stands in for inductor: the guards and
    recompilations are dynamo's whatever the backend."""
    import model as M
    from torch._dynamo.utils import counters
    from data import collate
    compile_ = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: compile_(fn, **{**kw, 'backend': 'aot_eager'}))
    M.compiled_flex_attention.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    model, tok = tiny_vlm()
    model.eval()
    model.llm.attention = 'flex'
    qa = [('what color is the circle?', 'red'), ('how many objects are there?', 'two'),
          ('describe the image.', TEXTS[5])]
    records = [{'image': k % 4, 'turns': [t for j in range(1 + k % 4) for t in (
        {'role': 'user', 'content': ('<image>\n' if j == 0 else '') + qa[(k + j) % 3][0]},
        {'role': 'assistant', 'content': qa[(k + j) % 3][1]})]} for k in range(40)]
    data = _Records(records, images(4).numpy())
    natural = set()
    with torch.no_grad():
        for i in range(20):
            idx = [(i * 7 + j) % 40 for j in range(2 + i % 5)]
            pack = i % 3 == 0
            args = (data, idx, tok, model.num_image_tokens, 160, None, True, pack)  # isolated turns: a mask
            natural.add(tuple(collate(*args)['input_ids'].shape))
            batch = collate(*args, pad_to_max=True)
            assert batch['input_ids'].shape[1] == 160
            model(**batch)
    assert len(natural) >= 10  # the shapes the batches would have had, unpadded
    assert counters['stats']['unique_graphs'] <= 2
    M.compiled_flex_attention.cache_clear()
