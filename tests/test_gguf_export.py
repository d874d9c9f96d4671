"""gguf_export.py (export.py --gguf): an Idefics3 run as llama.cpp's model.gguf + mmproj.gguf. Read back with gguf,
every tensor is the run's (f32 equal; f16 and q8_0 in their types), the metadata llama.cpp reads is there, and the
vocabulary, tokenized as llama.cpp tokenizes, gives glimpse's ids on every turn of a shapes split. A run that stock
llama.cpp would render differently is refused in one line, naming what to train with instead."""
import json
import os
import re
import sys
import unicodedata

import gguf
import jinja2
import numpy as np
import pytest
import torch

from checkpoint import ModelSpec, build_model, load_run, save_checkpoint
from conftest import run
from errors import GlimpseError
from export import export_gguf, glimpse_chat_template, text_config
from gguf_export import check_tokenizer
from model import DecoderConfig, apply_rope, rope_cos_sin

K = gguf.Keys


@pytest.fixture(scope='session')
def idefics3_runs(shapes_dir, tmp_path_factory):
    """{'word': out_dir, 'byte': out_dir}: tiny Idefics3 runs built in-process (no training: random weights, norms
    and biases moved off their initial values so that a misplaced one shows)."""
    texts = [t['content'] for line in open(os.path.join(shapes_dir, 'train.jsonl')) for t in json.loads(line)['turns']]
    runs = {}
    for kind in ('word', 'byte'):
        spec = ModelSpec(vit_layers=1, vit_width=32, vit_heads=2, connector='pixel_shuffle_linear', llm_layers=2,
                         llm_width=32, llm_heads=4, llm_kv_heads=2, llm_mlp_width=64, tokenizer=kind,
                         image_layout='idefics3')
        model, tok, cfg, _ = build_model(spec, 'cpu', texts)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        out = str(tmp_path_factory.mktemp('gguf_runs') / kind)
        save_checkpoint({'model': model.state_dict(), 'model_config': cfg.to_dict(), 'tokenizer': tok.state(),
                         'config': {}}, os.path.join(out, 'ckpt.pt'))
        runs[kind] = out
    return runs


def read(path):
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith('GGUF.')}
    return meta, {t.name: t for t in r.tensors}


def as_f32(t):
    """A GGUF tensor as float32 in PyTorch's shape (GGUF lists dimensions innermost first)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


def expected_tensors(model):
    """{gguf name: f32 array} of a glimpse VLM, written from llama.cpp's tensor names (llama-arch.cpp, clip-impl.h)
    independently of gguf's name tables; q and k as the run holds them (rotate-half layout), not yet permuted."""
    llm, out = model.llm.state_dict(), {}
    text = {'input_layernorm.weight': 'attn_norm.weight', 'self_attn.q_proj.weight': 'attn_q.weight',
            'self_attn.k_proj.weight': 'attn_k.weight', 'self_attn.v_proj.weight': 'attn_v.weight',
            'self_attn.o_proj.weight': 'attn_output.weight', 'post_attention_layernorm.weight': 'ffn_norm.weight',
            'mlp.gate_proj.weight': 'ffn_gate.weight', 'mlp.up_proj.weight': 'ffn_up.weight',
            'mlp.down_proj.weight': 'ffn_down.weight'}
    out['token_embd.weight'], out['output_norm.weight'] = llm['embed_tokens.weight'], llm['norm.weight']
    if not model.cfg.llm.tie_embeddings:
        out['output.weight'] = llm['lm_head.weight']
    for i in range(model.cfg.llm.n_layer):
        for ours, theirs in text.items():
            out[f'blk.{i}.{theirs}'] = llm[f'layers.{i}.{ours}']
    vt = model.vision_tower.state_dict()
    out['v.patch_embd.weight'], out['v.patch_embd.bias'] = vt['patch_embed.weight'], vt['patch_embed.bias']
    out['v.position_embd.weight'] = vt['pos_embed'][0]
    out['v.post_ln.weight'], out['v.post_ln.bias'] = vt['ln_post.weight'], vt['ln_post.bias']
    out['mm.model.fc.weight'] = model.connector.proj.weight
    vision = {'ln1': 'ln1', 'ln2': 'ln2', 'proj': 'attn_out', 'fc1': 'ffn_up', 'fc2': 'ffn_down'}
    for i in range(model.cfg.vision.n_layer):
        for kind in ('weight', 'bias'):
            for ours, theirs in vision.items():
                out[f'v.blk.{i}.{theirs}.{kind}'] = vt[f'blocks.{i}.{ours}.{kind}']
            for name, part in zip(('attn_q', 'attn_k', 'attn_v'), vt[f'blocks.{i}.qkv.{kind}'].chunk(3)):
                out[f'v.blk.{i}.{name}.{kind}'] = part
    return {k: v.detach().float().numpy() for k, v in out.items()}


def interleaved_rope(x, positions, theta):
    """llama.cpp's RoPE for arch 'llama' (rope mode 0): each head's pairs (2i, 2i+1) turned by p * theta^(-2i/d)."""
    d = x.shape[-1]
    angle = positions[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)  # (T, d/2)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten(-2)


def test_the_gguf_pair_holds_the_runs_weights_and_what_llama_cpp_reads(idefics3_runs, tmp_path):
    src = idefics3_runs['word']
    assert export_gguf(src, str(tmp_path), force=True)  # forced: every run is refused today (next test)
    model, tok = load_run(src)
    expected = expected_tensors(model)
    text_meta, text = read(tmp_path / 'model.gguf')
    vision_meta, vision = read(tmp_path / 'mmproj.gguf')
    assert set(text) | set(vision) == set(expected) and not set(text) & set(vision)
    d = model.cfg.llm
    hd = d.n_embd // d.n_head
    for name, t in {**text, **vision}.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        if name.startswith(('blk.0.attn_q', 'blk.0.attn_k', 'blk.1.attn_q', 'blk.1.attn_k')):
            continue  # permuted for llama.cpp's RoPE: checked below by what attention computes
        assert np.array_equal(as_f32(t), expected[name]), name
    # q and k: llama.cpp's RoPE on the written weights scores every query-key pair as glimpse's does on its own
    x, pos, group = torch.randn(5, d.n_embd), torch.arange(5), d.n_head // d.n_kv_head
    cos, sin = rope_cos_sin(pos[None], hd, d.rope_theta)
    heads = lambda w, n: (x @ torch.from_numpy(w).T).view(5, n, hd).transpose(0, 1)  # (heads, T, hd)
    scores = lambda q, k: q @ k.repeat_interleave(group, 0).transpose(1, 2)  # (heads, T, T)
    for i in range(d.n_layer):
        q, k = (heads(expected[f'blk.{i}.attn_{p}.weight'], n) for p, n in (('q', d.n_head), ('k', d.n_kv_head)))
        q2, k2 = (heads(as_f32(text[f'blk.{i}.attn_{p}.weight']), n) for p, n in (('q', d.n_head), ('k', d.n_kv_head)))
        ours = scores(apply_rope(q[None], cos, sin)[0], apply_rope(k[None], cos, sin)[0])
        theirs = scores(interleaved_rope(q2, pos, d.rope_theta), interleaved_rope(k2, pos, d.rope_theta))
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(q2, q)  # the permutation did something
    # the metadata llama.cpp's loaders read (llama-model.cpp, llama-vocab.cpp, clip.cpp)
    arch = 'llama'
    assert text_meta[K.General.ARCHITECTURE] == arch and text_meta[K.General.TYPE] == 'model'
    for key, value in {K.LLM.BLOCK_COUNT: d.n_layer, K.LLM.EMBEDDING_LENGTH: d.n_embd,
                       K.LLM.FEED_FORWARD_LENGTH: d.intermediate_size, K.Attention.HEAD_COUNT: d.n_head,
                       K.Attention.HEAD_COUNT_KV: d.n_kv_head, K.Rope.DIMENSION_COUNT: hd,
                       K.LLM.VOCAB_SIZE: d.vocab_size}.items():
        assert text_meta[key.format(arch=arch)] == value, key
    assert text_meta[K.Rope.FREQ_BASE.format(arch=arch)] == pytest.approx(d.rope_theta)
    assert text_meta[K.Attention.LAYERNORM_RMS_EPS.format(arch=arch)] == pytest.approx(d.norm_eps)
    assert text_meta[K.Tokenizer.MODEL] == 'bert' and len(text_meta[K.Tokenizer.LIST]) == d.vocab_size
    assert (text_meta[K.Tokenizer.BOS_ID], text_meta[K.Tokenizer.EOS_ID]) == (tok.bos_id, tok.eot_id)
    assert text_meta[K.Tokenizer.UNK_ID] == tok.unk_id and text_meta[K.Tokenizer.ADD_BOS] is True
    assert text_meta[K.Tokenizer.CHAT_TEMPLATE] == glimpse_chat_template('<end_of_utterance>')  # as for transformers
    v = model.cfg.vision
    assert vision_meta[K.General.ARCHITECTURE] == 'clip' and vision_meta[K.Clip.PROJECTOR_TYPE] == 'idefics3'
    for key, value in {K.ClipVision.IMAGE_SIZE: v.image_size, K.ClipVision.PATCH_SIZE: v.patch_size,
                       K.ClipVision.EMBEDDING_LENGTH: v.n_embd, K.ClipVision.FEED_FORWARD_LENGTH: 4 * v.n_embd,
                       K.ClipVision.BLOCK_COUNT: v.n_layer, K.ClipVision.Attention.HEAD_COUNT: v.n_head,
                       K.ClipVision.PROJECTION_DIM: d.n_embd, K.ClipVision.Projector.SCALE_FACTOR: 2,
                       K.ClipVision.PREPROC_IMAGE_SIZE: v.image_size, K.Clip.HAS_VISION_ENCODER: True,
                       K.ClipVision.USE_GELU: True}.items():
        assert vision_meta[key] == value, key
    assert vision_meta[K.ClipVision.Attention.LAYERNORM_EPS] == pytest.approx(v.norm_eps)
    assert vision_meta[K.ClipVision.IMAGE_MEAN] == pytest.approx(list(v.image_mean))
    assert vision_meta[K.ClipVision.IMAGE_STD] == pytest.approx(list(v.image_std))
    # forced files say so first
    assert text_meta[K.General.DESCRIPTION].startswith('written with --gguf_force')
    assert vision_meta[K.General.DESCRIPTION].startswith('written with --gguf_force')


@pytest.mark.parametrize('gguf_type', ['f16', 'q8_0'])
def test_f16_and_q8_0_files_hold_their_types(idefics3_runs, tmp_path, gguf_type):
    export_gguf(idefics3_runs['word'], str(tmp_path), gguf_type=gguf_type, force=True)
    qtype = gguf.GGMLQuantizationType.F16 if gguf_type == 'f16' else gguf.GGMLQuantizationType.Q8_0
    model, _ = load_run(idefics3_runs['word'])
    expected = expected_tensors(model)
    for path in ('model.gguf', 'mmproj.gguf'):
        meta, tensors = read(tmp_path / path)
        assert meta[K.General.FILE_TYPE] == {'f16': gguf.LlamaFileType.MOSTLY_F16,
                                             'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
        for name, t in tensors.items():
            f32 = len(t.shape) == 1 or name.startswith(('v.patch_embd', 'v.position_embd'))  # norms, biases, embeddings
            assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if f32 else qtype), name
            if name.startswith(('blk.0.attn_q', 'blk.0.attn_k', 'blk.1.attn_q', 'blk.1.attn_k')):
                continue  # permuted
            w = expected[name]
            tol = 0 if f32 else np.abs(w).max() / 127 if gguf_type == 'q8_0' else np.abs(w).max() / 1024
            np.testing.assert_allclose(as_f32(t), w, rtol=0, atol=tol, err_msg=name)


# llama.cpp's converter on export.py's Hugging Face directory, its vocabulary step skipped: it names a BPE
# pre-tokenizer by a hash table that knows no glimpse tokenizer (which is why gguf_export.py writes the files)
CONVERT = """import os, runpy, sys
src, hf_dir, out, outtype, mmproj = sys.argv[1:]
sys.path[:0] = [src, os.path.join(src, 'gguf-py')]
import conversion.llama
conversion.llama.LlamaModel.set_vocab = lambda self: None
sys.argv = ['convert_hf_to_gguf.py', hf_dir, '--outtype', outtype, '--outfile', out] + ['--mmproj'] * (mmproj == '1')
runpy.run_path(os.path.join(src, 'convert_hf_to_gguf.py'), run_name='__main__')
"""


@pytest.mark.skipif(not os.path.isfile(os.path.join(os.environ.get('LLAMA_CPP_SRC', ''), 'convert_hf_to_gguf.py')),
                    reason='LLAMA_CPP_SRC names no llama.cpp source tree (vendor/llama.cpp of llama-cpp-python sdist)')
@pytest.mark.parametrize('gguf_type', ['f32', 'q8_0'])
def test_the_files_equal_what_llama_cpps_own_converter_writes(idefics3_runs, tmp_path, gguf_type):
    """Every tensor byte for byte (names, types, shapes, data) and every metadata key outside tokenizer.* and
    general.*, against convert_hf_to_gguf.py DIR and DIR --mmproj on the same run's Hugging Face export."""
    from export import export
    export(idefics3_runs['byte'], str(tmp_path / 'hf'))
    export_gguf(idefics3_runs['byte'], str(tmp_path / 'ours'), gguf_type=gguf_type, force=True)
    for part, mmproj in (('model', '0'), ('mmproj', '1')):
        theirs_path = str(tmp_path / f'theirs_{part}.gguf')
        run([sys.executable, '-c', CONVERT, os.environ['LLAMA_CPP_SRC'], str(tmp_path / 'hf'), theirs_path, gguf_type,
             mmproj], env_extra={'PYTHONPATH': ''})
        (ours_meta, ours), (theirs_meta, theirs) = read(tmp_path / 'ours' / f'{part}.gguf'), read(theirs_path)
        assert ours and set(ours) == set(theirs)
        for name, t in ours.items():
            u = theirs[name]
            assert (t.tensor_type, list(t.shape)) == (u.tensor_type, list(u.shape)), name
            assert np.array_equal(np.asarray(t.data), np.asarray(u.data)), name
        keys = lambda meta: {k: v for k, v in meta.items() if not k.startswith(('tokenizer.', 'general.'))}
        assert keys(ours_meta) == keys(theirs_meta)


# -----------------------------------------------------------------------------
# the vocabulary, tokenized as llama.cpp tokenizes (src/llama-vocab.cpp)

def llama_cpp_tokenize(meta, text):
    """llama_tokenize(text, add_special=False, parse_special=True) of a 'bert' or byte-level 'gpt2' GGUF vocabulary,
    as src/llama-vocab.cpp does it: control tokens split off first (tokenizer_st_partition), then each run of text
    through llm_tokenizer_wpm_session or the BPE merges (llm_tokenizer_bpe_session)."""
    tokens, types = meta[K.Tokenizer.LIST], meta[K.Tokenizer.TOKEN_TYPE]
    ids = {t: i for i, t in enumerate(tokens)}
    specials = sorted((t for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL), key=len, reverse=True)
    out = []
    for part in re.split('(' + '|'.join(map(re.escape, specials)) + ')', text):
        if part in specials:
            out.append(ids[part])
        elif part and meta[K.Tokenizer.MODEL] == 'bert':
            out += wordpiece(part, ids, meta[K.Tokenizer.UNK_ID])
        elif part:
            out += byte_level_bpe(part, ids, meta[K.Tokenizer.MERGES])
    return out


def wordpiece(text, ids, unk):
    """llm_tokenizer_wpm_session: NFD without accents, lower-cased, split at whitespace and around punctuation and
    ASCII symbols; each word as '▁' + word, longest known prefix first, a word with an unknown rest one <unk>."""
    words, cur = [], ''
    for ch in unicodedata.normalize('NFD', text):
        cat = unicodedata.category(ch)
        if ch.isspace():
            words, cur = words + [cur], ''
        elif ch in '\0\ufffd' or cat == 'Cc' or cat == 'Mn':
            continue
        elif cat.startswith('P') or (ord(ch) < 0x7f and cat.startswith('S')):
            words, cur = words + [cur, ch.lower()], ''
        else:
            cur += ch.lower()
    by_bytes = {t.encode(): i for t, i in ids.items()}  # llama.cpp matches byte substrings
    out, longest = [], max(map(len, by_bytes))
    for word in (w for w in words + [cur] if w):
        b, i, pieces = ('\u2581' + word).encode(), 0, []
        while i < len(b):
            j = next((j for j in range(min(len(b), i + longest + 1), i, -1) if b[i:j] in by_bytes), None)
            if j is None:
                pieces = [unk]
                break
            pieces.append(by_bytes[b[i:j]])
            i = j
        out += pieces
    return out


def byte_level_bpe(text, ids, merges):
    """llm_tokenizer_bpe_session on one run of text: its bytes as GPT-2's byte symbols, merged pair by pair in the
    order of the merges list (the pre-tokenizer's split only bounds merges, and here none applies)."""
    from tokenizer import bytes_to_unicode
    table = bytes_to_unicode()
    symbols, rank = [table[b] for b in text.encode()], {tuple(m.split(' ', 1)): r for r, m in enumerate(merges)}
    while True:
        pairs = [(rank[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in rank]
        if not pairs:
            return [ids[s] for s in symbols]
        _, i = min(pairs)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]


def shapes_turns(shapes_dir, split='test'):
    return [[dict(t) for t in json.loads(line)['turns']] for line in open(os.path.join(shapes_dir, f'{split}.jsonl'))]


@pytest.mark.parametrize('kind', ['word', 'byte'])
def test_the_vocabulary_gives_glimpses_ids_on_every_turn_of_a_shapes_split(idefics3_runs, shapes_dir, tmp_path, kind):
    export_gguf(idefics3_runs[kind], str(tmp_path), force=True)
    meta, _ = read(tmp_path / 'model.gguf')
    _, tok = load_run(idefics3_runs[kind])
    conversations = shapes_turns(shapes_dir)
    # every turn, and text with what the split lacks: capitals, punctuation runs, tabs, words never seen (<unk>)
    texts = [t['content'] for turns in conversations for t in turns] + [
        "What's the COLOR of the zebra-like square?!\t(left)  42", 'circle,square...  triangle\n\nno']
    for text in texts:
        assert llama_cpp_tokenize(meta, text) == tok.encode(text), text
    # whole conversations through the GGUF's chat template, as llama-mtmd-cli --jinja renders them: llama.cpp drops
    # the template's leading <bos> text and adds the token (add_bos_token); the image stays mtmd's (no '<image>' here)
    template = jinja2.Environment().from_string(meta[K.Tokenizer.CHAT_TEMPLATE])
    bos = meta[K.Tokenizer.LIST][meta[K.Tokenizer.BOS_ID]]
    for turns in conversations[:8]:
        turns = [dict(t, content=t['content'].replace('<image>\n', '')) for t in turns]
        parts = [{**turns[0], 'content': [{'type': 'text', 'text': turns[0]['content']}]}]  # a processor's message
        for messages in (turns[:1], turns[:3], parts):
            prompt = template.render(messages=messages, add_generation_prompt=True)
            assert prompt.startswith(bos)
            ids = [meta[K.Tokenizer.BOS_ID]] + llama_cpp_tokenize(meta, prompt[len(bos):])
            as_text = [{**m, 'content': m['content'] if isinstance(m['content'], str) else m['content'][0]['text']}
                       for m in messages]
            assert ids == tok.encode_chat(as_text, 0, add_generation_prompt=True)[0]


@pytest.mark.parametrize('kind', ['word', 'byte'])
def test_llama_cpp_itself_tokenizes_as_glimpse(idefics3_runs, shapes_dir, tmp_path, kind):
    """The reference above against llama.cpp's own tokenizer, where llama-cpp-python is installed (not here: it
    builds llama.cpp from source, ~8 CPU-minutes)."""
    llama_cpp = pytest.importorskip('llama_cpp')
    export_gguf(idefics3_runs[kind], str(tmp_path), force=True)
    llm = llama_cpp.Llama(str(tmp_path / 'model.gguf'), vocab_only=True, verbose=False)
    _, tok = load_run(idefics3_runs[kind])
    for text in [t['content'] for turns in shapes_turns(shapes_dir) for t in turns] + ["What's the COLOR?!\t42"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text


# -----------------------------------------------------------------------------
# refusals

def test_a_run_llama_cpp_would_render_differently_is_refused_in_one_line(idefics3_runs, tmp_path):
    p = run([sys.executable, 'export.py', idefics3_runs['byte'], str(tmp_path / 'x'), '--gguf'], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('export error: gguf: stock llama.cpp renders every Idefics3 image '
                                                   'as tiles plus an overview'), p.stderr
    assert 'train with image_splitting=True (config/shapes_gguf.py)' in lines[0] and '--gguf_force=True' in lines[0]
    assert "train with vit_act='gelu_tanh'" in lines[0]
    assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('change,clause', [
    (dict(tokenizer='byte'), "a byte vocabulary has not: train with tokenizer='word'"),
    (dict(image_resample='bicubic'), "its images were resized bicubic, llama.cpp resizes Idefics3 images with Lanczos"),
    (dict(vit_act='gelu'), "its tower's GELU is the exact (erf) one"),
])
def test_a_split_run_is_refused_for_each_thing_llama_cpp_does_otherwise(shapes_dir, change, clause):
    from gguf_export import llama_cpp_differences
    texts = [t['content'] for line in open(os.path.join(shapes_dir, 'train.jsonl')) for t in json.loads(line)['turns']]
    keys = dict(vit_layers=1, vit_width=32, vit_heads=2, connector='pixel_shuffle_linear', llm_layers=1, llm_width=32,
                image_layout='idefics3', image_size=32, image_splitting=True, max_image_size=96, vit_act='gelu_tanh',
                image_resample='lanczos')
    model, tok, cfg, _ = build_model(ModelSpec(**keys), 'cpu', texts)
    assert llama_cpp_differences(cfg, tok, model.num_image_tokens) == []  # the exportable recipe's choices
    model, tok, cfg, _ = build_model(ModelSpec(**{**keys, **change}), 'cpu', texts)
    assert [d for d in llama_cpp_differences(cfg, tok, model.num_image_tokens) if clause in d]


def test_a_pretrained_tokenizer_is_refused_in_one_line_and_the_converter_can_take_its_export():
    with pytest.raises(GlimpseError, match=r"export error: tokenizer: a pretrained LLM's tokenizer; .* "
                                           r"convert_hf_to_gguf.py DIR, and DIR --mmproj$"):
        check_tokenizer(object())
    # what llama.cpp's converter reads to pick its text model, in the Hugging Face export's text_config
    from tokenizer import Tokenizer
    assert text_config(DecoderConfig(), Tokenizer())['architectures'] == ['LlamaForCausalLM']
    assert text_config(DecoderConfig(qkv_bias=True), Tokenizer())['architectures'] == ['Qwen2ForCausalLM']


def test_a_split_image_run_exports_unforced_with_its_longest_edge_and_tile_tokens(shapes_dir, tmp_path):
    """The exportable recipe's choices: no refusal; the mmproj gives llama.cpp the longest edge it splits at, and
    the vocabulary holds the tile markers (control tokens) and '\\n', '\\n\\n' (user-defined: taken whole
    wherever they stand, as glimpse's word tokenizer takes them) at glimpse's ids."""
    texts = [t['content'] for line in open(os.path.join(shapes_dir, 'train.jsonl')) for t in json.loads(line)['turns']]
    spec = ModelSpec(vit_layers=1, vit_width=32, vit_heads=2, connector='pixel_shuffle_linear', llm_layers=1,
                     llm_width=32, image_layout='idefics3', image_size=32, image_splitting=True, max_image_size=96,
                     vit_act='gelu_tanh', image_resample='lanczos')
    model, tok, cfg, _ = build_model(spec, 'cpu', texts)
    save_checkpoint({'model': model.state_dict(), 'model_config': cfg.to_dict(), 'tokenizer': tok.state(),
                     'config': {}}, str(tmp_path / 'run' / 'ckpt.pt'))
    assert export_gguf(str(tmp_path / 'run'), str(tmp_path / 'files')) == []
    text_meta, _ = read(tmp_path / 'files' / 'model.gguf')
    vision_meta, _ = read(tmp_path / 'files' / 'mmproj.gguf')
    assert vision_meta[K.ClipVision.PREPROC_IMAGE_SIZE] == 96 and vision_meta[K.ClipVision.IMAGE_SIZE] == 32
    tokens, types = text_meta[K.Tokenizer.LIST], text_meta[K.Tokenizer.TOKEN_TYPE]
    for text in ('<row_1_col_1>', '<row_6_col_6>', '\n', '\n\n', '<fake_token_around_image>', '<global-img>'):
        i = tokens.index(text)
        assert i == tok.stoi[text]
        assert types[i] == (gguf.TokenType.USER_DEFINED if text.startswith('\n') else gguf.TokenType.CONTROL)
    assert 'FORCED' not in text_meta.get(K.General.DESCRIPTION, '')


# -----------------------------------------------------------------------------
# the real client, where it is installed

GGUF_SPLIT = ['--connector=pixel_shuffle_linear', '--image_layout=idefics3', '--image_size=32', '--max_image_size=64',
              '--image_splitting=True', '--vit_act=gelu_tanh', '--image_resample=lanczos', '--max_seq_len=160']


def mtmd_answer(cli, files, image_path, question, n=8):
    """llama-mtmd-cli's greedy answer about one image, prompted as glimpse asks (the image, a newline, the
    question) through the GGUF's own chat template (--jinja). It prints the answer through an asynchronous log
    thread that now and then exits having printed nothing (about 1 call in 100, docs/LOG.md): asked again then."""
    import subprocess
    for _ in range(3):
        p = subprocess.run([cli, '-m', f'{files}/model.gguf', '--mmproj', f'{files}/mmproj.gguf', '--jinja',
                            '--image', str(image_path), '-p', '<__media__>\n' + question, '--temp', '0', '-n', str(n),
                            '-t', '2'], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        if p.stdout.strip():
            break
    return p.stdout.strip()


@pytest.mark.skipif(not __import__('shutil').which('llama-mtmd-cli'), reason='llama-mtmd-cli is not on PATH '
                    '(build it from the llama-cpp-python sdist: docs/LOG.md)')
def test_llama_mtmd_cli_answers_as_glimpse_on_20_questions(shapes_dir, tmp_path):
    import shutil
    from PIL import Image
    from test_export import train
    out = train(shapes_dir, tmp_path / 'run', *GGUF_SPLIT, '--max_iters=30', '--eval_interval=30')
    p = run([sys.executable, 'export.py', str(out), str(tmp_path / 'files'), '--gguf'])
    assert 'FORCED' not in p.stdout
    model, tok = load_run(str(out))
    model.eval()
    images = np.load(os.path.join(shapes_dir, 'images.npy'), mmap_mode='r')
    items = [(r['image'], x) for r in map(json.loads, open(os.path.join(shapes_dir, 'test.jsonl'))) for x in r['qa']]
    for row, x in items[:20]:
        path = tmp_path / f'{row}.png'
        Image.fromarray(np.asarray(images[row])).save(path)
        ours = model.chat(tok, np.asarray(images[row])[None], [x['q']], max_new_tokens=8)[0]
        assert mtmd_answer(shutil.which('llama-mtmd-cli'), tmp_path / 'files', path, x['q']) == ours.strip(), x['q']
