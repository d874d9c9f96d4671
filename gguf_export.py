"""
An Idefics3 export of a glimpse run -> the two GGUF files llama.cpp reads: model.gguf (the Llama text model, its
vocabulary and chat template) and mmproj.gguf (the SigLIP tower and Idefics3's projector, as llama.cpp's mtmd reads
a SmolVLM's). Written with gguf, the library of llama.cpp's own converter (convert_hf_to_gguf.py), the way that
converter writes a SmolVLM:

    tensor names  the Hugging Face model's, mapped by gguf.get_tensor_name_map (the text model's after the
                  converter's rename of model.text_model. to model.)
    q and k       of the Llama text model permuted from the rotate-half RoPE layout to llama.cpp's (permute_rope)
    types         f32, f16 or q8_0 (gguf_type); norms, biases and the tower's embeddings stay f32, and a q8_0 tensor
                  whose rows are not whole 32-value blocks goes f16, as in the converter
    vocabulary    glimpse's word tokenizer as a WordPiece ('bert') vocabulary, every word one whole piece; its byte
                  tokenizer as a byte-level BPE ('gpt2') vocabulary of the 256 bytes, no merge ever applying
                  (glimpse_vocab says why each reproduces glimpse's ids)

What stock llama.cpp would still render differently from what a run trained on is in llama_cpp_differences; export.py
refuses such a run unless asked to write it anyway (--gguf_force).
"""
import os
from dataclasses import dataclass

import gguf

from errors import GlimpseError
from tokenizer import Tokenizer, bytes_to_unicode

GGUF_TYPES = {'f32': (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
              'f16': (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
              'q8_0': (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0)}
WORDPIECE_SPACE = '\u2581'  # llama.cpp's WordPiece looks each word up as '▁' + word: a whole-word piece


def check_gguf_type(gguf_type):
    if gguf_type not in GGUF_TYPES:
        raise GlimpseError(f"export error: --gguf_type={gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")


def llama_cpp_differences(cfg, tok, n_image_tokens):
    """What stock llama.cpp (its mtmd library: llama-mtmd-cli, llama-server --mmproj) would give this Idefics3 run
    (cfg its VLMConfig, tok its Tokenizer) that differs from what it trained on, one clause each; empty when it
    renders the run as trained. llama.cpp splits every Idefics3 image (mtmd_image_preprocessor_idefics3) by the
    processor's rules, resizing with its own Lanczos, and writes transformers' layout for a split image: the tiles
    with <row_i_col_j>, '\\n' after each row but the last, then '\\n\\n' and the global view (mtmd.cpp)."""
    n, v, diffs = f'[{n_image_tokens} image tokens]', cfg.vision, []
    if not cfg.max_image_size:
        diffs.append(f"stock llama.cpp renders every Idefics3 image as tiles plus an overview, even one that fits one "
                     f"tile (<fake_token_around_image><row_1_col_1>{n}\\n\\n<fake_token_around_image><global-img>{n}"
                     f"<fake_token_around_image>), but glimpse trained this run on the overview alone, as transformers "
                     f"renders it: train with image_splitting=True (config/shapes_gguf.py)")
    elif tok.kind != 'word':
        diffs.append("llama.cpp looks up '\\n' and '\\n\\n' as whole tokens around a split image's tiles, which a "
                     "byte vocabulary has not: train with tokenizer='word'")
    if cfg.max_image_size and v.resample != 'lanczos':
        diffs.append(f"its images were resized {v.resample}, llama.cpp resizes Idefics3 images with Lanczos: train with "
                     f"image_resample='lanczos'")
    if v.act == 'gelu':  # an mmproj declares llama.cpp's tanh GELU (use_gelu) or the quick one, no erf
        diffs.append("its tower's GELU is the exact (erf) one, an Idefics3 mmproj's the tanh approximation: train "
                     "with vit_act='gelu_tanh'")
    return diffs


def permute_rope(w, n_head):
    """q or k weights (rows grouped by head) from the rotate-half RoPE layout (Hugging Face Llama, glimpse) to the
    interleaved one llama.cpp applies to arch 'llama': in each head, row i of the first half and row i of the second
    half become rows 2i and 2i+1 (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(hf_name, gguf_name, array, wanted):
    """The GGML type the converter gives a tensor when asked for wanted (ModelBase.prepare_tensors)."""
    if array.ndim <= 1 or gguf_name.endswith('_norm.weight') or not gguf_name.endswith('.weight') \
            or '.embeddings.' in hf_name:  # SmolVLMModel.tensor_force_quant: the tower's patch and positions
        return gguf.GGMLQuantizationType.F32
    return wanted


def add_tensors(writer, tensors, wanted):
    """tensors: {gguf name: (hf name, float32 array)} into writer, each in the type tensor_type picks."""
    for name, (hf_name, array) in tensors.items():
        qtype = tensor_type(hf_name, name, array, wanted)
        try:
            data = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:  # q8_0 needs rows of whole 32-value blocks
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)


def map_names(state, arch, n_blocks, rename=lambda name: name):
    """{gguf name: (hf name, array)} of a Hugging Face state dict, every name mapped by gguf's table (strict)."""
    table = gguf.get_tensor_name_map(arch, n_blocks)
    out = {}
    for hf_name, t in state.items():
        name = table.get_name(rename(hf_name), try_suffixes=('.weight', '.bias'))
        if name is None:
            raise GlimpseError(f'export error: gguf has no {gguf.MODEL_ARCH_NAMES[arch]} tensor for {hf_name}; '
                               f'this model cannot be written as GGUF')
        out[name] = (hf_name, t.detach().float().cpu().numpy())
    return out


@dataclass
class Vocab:
    """What a GGUF holds of a tokenizer (the tokenizer.ggml.* keys)."""
    model: str  # 'bert' (WordPiece) or 'gpt2' (byte-level BPE)
    pre: str
    tokens: list
    types: list
    merges: list
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    sep_id: int


def glimpse_vocab(tok, end_token, n_vocab):
    """glimpse's Tokenizer as a llama.cpp vocabulary with the same ids, the end-of-turn token named end_token (as in
    the Hugging Face export); n_vocab: the model's embedding rows (any past the tokenizer's are unused).
      word  WordPiece ('bert'): llama.cpp splits text at whitespace and around each punctuation or ASCII symbol
            character, lower-cases it (and drops accents and control characters), and looks up each piece as
            '▁' + piece, which here is a whole word or nothing (<unk>): glimpse's Tokenizer.WORD_RE, for ASCII
            text. Where text glues a non-ASCII letter to a word ('café') the two split it differently.
      byte  byte-level BPE ('gpt2') with the 256 byte symbols of GPT-2's alphabet at glimpse's byte ids: every
            byte of any text is one symbol, and with no merge that ever applies each symbol is one token. llama.cpp
            refuses a BPE vocabulary without merges and gguf cannot write an empty list, so it holds one merge of two
            special tokens' texts, which never occur as BPE symbols (special texts are split off before BPE).
    Special tokens are control tokens, which llama.cpp finds in a chat template's text ('<bos><|user|>...'), as are
    the tile markers of a split-image run; its '\\n' and '\\n\\n' are user-defined tokens, which llama.cpp takes
    whole wherever they stand, as glimpse's word tokenizer does (Tokenizer.TILE_RE)."""
    specials = [end_token if s == '<|end|>' else s for s in tok.specials]
    if tok.kind == 'word':
        model, pre, pieces, merges = 'bert', 'default', [WORDPIECE_SPACE + w for w in tok.words], []
    else:
        model, pre, merges = 'gpt2', 'gpt-2', [f'{specials[0]} {specials[0]}']
        pieces = bytes_to_unicode()
    extra = tok.extras  # the tile markers (and newlines) of image splitting, last
    tokens = specials + pieces + extra
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * len(pieces) + \
        [gguf.TokenType.USER_DEFINED if t.startswith('\n') else gguf.TokenType.CONTROL for t in extra]
    if n_vocab < len(tokens):
        raise GlimpseError(f'export error: the model has {n_vocab} token embeddings for a vocabulary of {len(tokens)}')
    tokens += [f'[PAD{i}]' for i in range(len(tokens), n_vocab)]
    types += [gguf.TokenType.UNUSED] * (n_vocab - len(types))
    # sep: WordPiece appends one whenever a caller asks llama_tokenize for special tokens (mtmd never does)
    return Vocab(model, pre, tokens, types, merges, tok.bos_id, tok.eot_id, tok.unk_id, tok.pad_id, tok.pad_id)


def check_tokenizer(tok):
    """Refuses a tokenizer glimpse cannot write as a llama.cpp vocabulary with the same ids."""
    if not isinstance(tok, Tokenizer):
        raise GlimpseError(
            "export error: tokenizer: a pretrained LLM's tokenizer; llama.cpp names its pre-tokenizer from a hash "
            "table in its own converter, which glimpse does not copy: write the Hugging Face directory (python "
            "export.py RUN DIR) and convert it with llama.cpp's convert_hf_to_gguf.py DIR, and DIR --mmproj")


def open_writer(path, arch, name, gguf_type, file_type, note):
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(file_type)
    writer.add_name(name)
    if note:  # what a reader of the file should know first (export.py: that it was forced)
        writer.add_description(note)
    writer.add_file_type(GGUF_TYPES[gguf_type][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return writer


def finish(writer, path):
    """Header, metadata and tensors to path + '.tmp', then renamed: a crash never leaves a half-written file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(writer.path, path)


def write_text_model(path, state, text, vocab, chat_template, gguf_type, name, note=''):
    """model.gguf: the Llama text model of an Idefics3 state dict (model.text_model.*, lm_head), with text (the
    text_config export.py gives transformers), vocab and the chat template."""
    if text['model_type'] != 'llama':
        raise GlimpseError(f"export error: gguf: a {text['model_type']} text model (q/k/v biases); glimpse writes "
                           f"Llama-layout decoders as GGUF")
    arch, n_head, n_kv_head = gguf.MODEL_ARCH.LLAMA, text['num_attention_heads'], text['num_key_value_heads']
    head_dim = text['hidden_size'] // n_head
    own = {k: v for k, v in state.items() if k.startswith('model.text_model.') or k == 'lm_head.weight'}
    if text['tie_word_embeddings']:  # llama.cpp reads token_embd as the output matrix when output is absent
        own.pop('lm_head.weight', None)
    tensors = map_names(own, arch, text['num_hidden_layers'], lambda k: k.replace('model.text_model.', 'model.'))
    for key, heads in ((gguf.MODEL_TENSOR.ATTN_Q, n_head), (gguf.MODEL_TENSOR.ATTN_K, n_kv_head)):
        for bid in range(text['num_hidden_layers']):
            q_or_k = gguf.TENSOR_NAMES[key].format(bid=bid) + '.weight'
            hf_name, w = tensors[q_or_k]
            tensors[q_or_k] = (hf_name, permute_rope(w, heads))
    w = open_writer(path + '.tmp', arch, name, gguf_type, gguf.GGUFType.MODEL, note)
    w.add_vocab_size(len(vocab.tokens))
    w.add_context_length(text['max_position_embeddings'])
    w.add_embedding_length(text['hidden_size'])
    w.add_feed_forward_length(text['intermediate_size'])
    w.add_block_count(text['num_hidden_layers'])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv_head)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(text['rope_theta'])
    w.add_layer_norm_rms_eps(text['rms_norm_eps'])
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types([int(t) for t in vocab.types])
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_uint32(gguf.Keys.Tokenizer.EOT_ID, vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_pad_token_id(vocab.pad_id)
    w.add_sep_token_id(vocab.sep_id)
    # the template writes <bos> first; llama.cpp drops it from the rendered text and adds the token itself
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_sep_token(False)
    w.add_chat_template(chat_template)
    add_tensors(w, tensors, GGUF_TYPES[gguf_type][1])
    finish(w, path)


def write_mmproj(path, state, vision, scale_factor, n_embd_text, image_mean, image_std, gguf_type, name, note='',
                 longest_edge=0):
    """mmproj.gguf: the SigLIP tower and the projector of an Idefics3 state dict (model.vision_model.*,
    model.connector.*), with vision (the vision_config export.py gives transformers), as llama.cpp's converter
    writes SmolVLM's."""
    arch = gguf.MODEL_ARCH.MMPROJ
    own = {k: v for k, v in state.items() if k.startswith(('model.vision_model.', 'model.connector.'))}
    tensors = map_names(own, arch, vision['num_hidden_layers'])
    w = open_writer(path + '.tmp', arch, name, gguf_type, gguf.GGUFType.MMPROJ, note)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
    w.add_vision_projection_dim(n_embd_text)
    w.add_vision_image_size(vision['image_size'])
    # the processor's longest edge (image splitting: max_image_size), else one tile
    w.add_vision_preproc_image_size(longest_edge or vision['image_size'])
    w.add_vision_patch_size(vision['patch_size'])
    w.add_vision_embedding_length(vision['hidden_size'])
    w.add_vision_feed_forward_length(vision['intermediate_size'])
    w.add_vision_block_count(vision['num_hidden_layers'])
    w.add_vision_head_count(vision['num_attention_heads'])
    w.add_vision_attention_layernorm_eps(vision['layer_norm_eps'])
    w.add_vision_projector_scale_factor(scale_factor)
    w.add_vision_image_mean(list(image_mean))
    w.add_vision_image_std(list(image_std))
    # llama.cpp's tower MLP: use_gelu, its tanh GELU (SigLIP's gelu_pytorch_tanh); otherwise the quick GELU (CLIP's)
    w.add_vision_use_gelu(vision['hidden_act'] != 'quick_gelu')
    add_tensors(w, tensors, GGUF_TYPES[gguf_type][1])
    finish(w, path)
