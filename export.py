"""
A glimpse run -> a Hugging Face model directory that transformers and vLLM load with the Auto classes and no
trust_remote_code: config.json, model.safetensors, the processor and tokenizer files with the chat template,
generation_config.json and a short README.md. Or, with --gguf, an Idefics3 run -> the GGUF pair llama.cpp reads
(gguf_export.py): model.gguf and mmproj.gguf.

    python export.py out/<run> out/<run>_hf                      # the run's ckpt.pt
    python export.py out/<run> out/<run>_hf --checkpoint=best.pt
    python export.py out/<run> out/<run>_gguf --gguf [--gguf_type=f32|f16|q8_0] [--gguf_force=True]

The target follows from the run's architecture:
    Idefics3 (SmolVLM)  connector='pixel_shuffle_linear' on a SigLIP-style tower (glimpse's ViT without
                        overlapping patches, or a loaded SigLIP) read after its final LayerNorm, trained with
                        image_layout='idefics3'
    LLaVA               connector='mlp' on a SigLIP- or CLIP-style tower read before its final LayerNorm (a
                        loaded tower with vision_layer=-2, as LLaVA reads CLIP)
    the language model: glimpse's Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2 layouts)
    a hf_vlm run        its Hugging Face model, adapters merged, as it is
LoRA adapters are merged first (QLoRA bases dequantised). glimpse's word and byte tokenizers go out as a
PreTrainedTokenizerFast whose chat template writes glimpse's prompt format; a pretrained LLM's tokenizer goes out
as it is. A run that cannot map stops with one line naming the key that prevents it.

--gguf refuses, in one line, a run that stock llama.cpp would render differently from how it trained
(gguf_export.llama_cpp_differences): one without image splitting (llama.cpp tiles every Idefics3 image), a byte
vocabulary with splitting, images not resized with Lanczos, an exact-GELU tower. config/shapes_gguf.py avoids all
four. --gguf_force=True writes the files anyway, for inspection, marked so in their general.description. What was
checked: read back with gguf, every tensor is the run's and the metadata is there; the vocabulary, tokenized by
llama.cpp's rules as written in the test, gives glimpse's ids on a shapes split; tensors and metadata equal what
llama.cpp's own converter writes (tests/test_gguf_export.py). Stock llama-mtmd-cli (llama-cpp-python 0.3.36's
llama.cpp, unpatched, --jinja) answered 600 of 600 test questions of a shapes_gguf.py run as glimpse does from
the f32 files, and 597 from q8_0 (docs/LOG.md).
"""
import json
import os
import sys

import torch

from checkpoint import load_run
from errors import GlimpseError
from gguf_export import (check_gguf_type, check_tokenizer, glimpse_vocab, llama_cpp_differences, write_mmproj,
                         write_text_model)
from lora import merge_lora
from pretrained import HFVLM, vision_name_map
from tokenizer import HFTokenizer, Tokenizer, bytes_to_unicode

# Lets a processor's list-of-parts messages ({'type': 'image'} / {'type': 'text'}) reach a template written for
# text: each message becomes one string, an image as '<image>\n' before the text, as glimpse writes a question.
FLATTEN = ("{%- set ns = namespace(messages=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
           "{%- set ns.messages = ns.messages + [m] -%}{%- else -%}{%- set t = namespace(s='') -%}"
           "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}{%- set t.s = t.s + '<image>\\n' -%}"
           "{%- else -%}{%- set t.s = t.s + c['text'] -%}{%- endif -%}{%- endfor -%}"
           "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': t.s}] -%}{%- endif -%}"
           "{%- endfor -%}{%- set messages = ns.messages -%}")


def glimpse_chat_template(end):
    """glimpse's prompt format: <bos>, then per turn <|user|> or <|assistant|>, its text, the end-of-turn token."""
    return (FLATTEN + "{{ '<bos>' }}{% for m in messages %}{{ '<|assistant|>' if m['role'] == 'assistant' "
            "else '<|user|>' }}{{ m['content'] }}{{ '" + end + "' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def export_tokenizer(tok, end_token):
    """glimpse's Tokenizer as a PreTrainedTokenizerFast with the same ids (the end-of-turn token named end_token),
    or a pretrained LLM's own tokenizer; with the chat template that writes what glimpse trained on."""
    if isinstance(tok, HFTokenizer):
        hf = tok.tok
        hf.chat_template = FLATTEN + hf.chat_template
        if hf.pad_token is None:  # glimpse pads with the end-of-turn token (always masked)
            hf.pad_token = hf.convert_ids_to_tokens(tok.eot_id)
        return hf
    from tokenizers import Regex, Tokenizer as RawTokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = [end_token if s == '<|end|>' else s for s in tok.specials]
    extra = tok.extras  # image splitting's tile markers (and newlines), last
    if tok.kind == 'word':
        raw = RawTokenizer(models.WordLevel({s: i for i, s in enumerate(specials + tok.words + extra)},
                                            unk_token='<unk>'))
        raw.normalizer = normalizers.Lowercase()
        # Tokenizer.WORD_RE: runs of letters and digits, or one other character; whitespace between them goes
        raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(
            Regex(r'[a-z0-9]+|[^\sa-z0-9]'), behavior='isolated')])
        raw.decoder = decoders.WordPiece(prefix='##', cleanup=True)  # words joined by spaces, none before ". , ? !"
    else:  # bytes: the 256 byte symbols of the ByteLevel alphabet, byte b at id len(specials) + b, no merges
        byte_char = {b: c for b, c in zip(range(256), bytes_to_unicode())}
        vocab = {**{s: i for i, s in enumerate(specials)}, **{byte_char[b]: len(specials) + b for b in range(256)},
                 **{s: len(specials) + 256 + i for i, s in enumerate(extra)}}
        raw = RawTokenizer(models.BPE(vocab, []))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        raw.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token='<bos>', eos_token=end_token, pad_token='<pad>',
                                 unk_token='<unk>', additional_special_tokens=[s for s in specials + extra if s not in (
                                     '<bos>', end_token, '<pad>', '<unk>')])
    hf.chat_template = glimpse_chat_template(end_token)
    return hf


def target_of(cfg, tok):
    """'idefics3' or 'llava' for a glimpse VLMConfig, or the one-line reason it maps to neither."""
    v, c = cfg.vision, cfg.connector
    why = lambda key, text: GlimpseError(f'export error: {key}: {text}')
    if cfg.hf_llm:
        raise why('llm', f"a {cfg.hf_llm.get('model_type')} model run through HFCausalLM; Idefics3 and LLaVA take a "
                         f"Llama-family decoder (llm='scratch', or a Llama, SmolLM2, Mistral or Qwen2 checkpoint)")
    if c.kind not in ('pixel_shuffle_linear', 'mlp'):
        raise why('connector', f"{c.kind!r} has no Hugging Face counterpart; train with connector='pixel_shuffle_linear' "
                               f"(exports to Idefics3) or 'mlp' (LLaVA)")
    if tok.image_token_labels:
        raise why('image_token_labels', 'words between the image tokens, which no Hugging Face processor writes; '
                                        'train with image_token_labels=()')
    if c.out_norm:
        raise why('connector_norm', 'True: LLaVA\'s projector ends without a norm; train with --connector_norm=False')
    if v.patch_overlap:
        raise why('patch_overlap', f'{v.patch_overlap}: overlapping patches have no Hugging Face counterpart; train '
                                   f'with --patch_overlap=0')
    if v.n_registers or v.layer_scale:
        raise why('vision', f'{v.source or "the tower"} is DINOv2-style (registers or layer scale), which neither '
                            f'Idefics3 nor LLaVA builds; use a SigLIP or CLIP tower')
    if c.kind == 'pixel_shuffle_linear':
        if v.cls_token or v.pre_norm or not v.post_norm:
            raise why('vision', 'Idefics3 reads a SigLIP-style tower (no class token, no pre-norm) after its final '
                                'LayerNorm; use vision_layer=-1 on such a tower')
        if tok.image_layout != 'idefics3':
            raise why('image_layout', "'plain': Idefics3 writes <fake_token_around_image><global-img> around the image "
                                      "tokens; train with --image_layout=idefics3 so the model saw that layout")
        return 'idefics3'
    if cfg.max_image_size:
        raise why('image_splitting', "LLaVA's processor shows one view of each image, and LLaVA-NeXT's AnyRes tiles by "
                                     "other rules; glimpse splits images as Idefics3 does: train with "
                                     "connector='pixel_shuffle_linear' and image_layout='idefics3'")
    if v.post_norm:
        raise why('vision_layer', "LLaVA reads a tower's hidden state before its final LayerNorm; train on a loaded "
                                  "tower with --vision_layer=-2 (or export connector='pixel_shuffle_linear' to Idefics3)")
    if tok.image_layout != 'plain':
        raise why('image_layout', f"{tok.image_layout!r}: LLaVA writes the image tokens alone; train with "
                                  f"--image_layout=plain")
    if v.cls_token and (v.keep_cls or not v.pre_norm or v.patch_bias):
        raise why('vision', 'a tower with a class token exports as CLIP (pre-norm, no patch bias, the class token '
                            'dropped: vision_cls=False)')
    return 'llava'


def vision_export(v, tower_state):
    """(config kwargs, state dict) of a SiglipVisionModel or CLIPVisionModel holding glimpse's tower."""
    family = 'clip' if v.cls_token else 'siglip'
    m, _, _ = vision_name_map(family, v.n_layer, last=v.post_norm)
    state = {}
    for nat, hf in m.items():
        t = tower_state[nat]
        if isinstance(hf, list):  # qkv -> q, k, v
            for name, part in zip(hf, t.chunk(3)):
                state[name] = part
        else:
            state[hf] = t.reshape(-1) if nat == 'cls_token' else t[0] if nat == 'pos_embed' else t
    if family == 'siglip' and not v.post_norm:  # read before it (LLaVA): present, and the identity
        state['post_layernorm.weight'], state['post_layernorm.bias'] = torch.ones(v.n_embd), torch.zeros(v.n_embd)
    if family == 'clip':  # CLIP's post_layernorm makes the pooled output only
        state['post_layernorm.weight'], state['post_layernorm.bias'] = torch.ones(v.n_embd), torch.zeros(v.n_embd)
    act = {'gelu': 'gelu', 'gelu_tanh': 'gelu_pytorch_tanh', 'quick_gelu': 'quick_gelu'}[v.act]
    config = dict(hidden_size=v.n_embd, intermediate_size=round(v.n_embd * v.mlp_ratio), num_hidden_layers=v.n_layer,
                  num_attention_heads=v.n_head, num_channels=3, image_size=v.image_size, patch_size=v.patch_size,
                  hidden_act=act, layer_norm_eps=v.norm_eps)
    return family, config, state


def image_processor_config(v, target, max_image_size=0):
    """The Hugging Face image processor that prepares pixels as glimpse's VisionTower.pixels does; with
    max_image_size (image splitting), one that tiles as tiling.Tiler does (its rules are the processor's)."""
    resample = {'bicubic': 3, 'bilinear': 2, 'lanczos': 1}[v.resample]  # PIL's numbers
    common = dict(do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(v.image_mean),
                  image_std=list(v.image_std), resample=resample, do_convert_rgb=True)
    if target == 'idefics3':
        from transformers import Idefics3ImageProcessor
        if max_image_size:
            return Idefics3ImageProcessor(do_resize=True, size={'longest_edge': max_image_size}, do_image_splitting=True,
                                          max_image_size={'longest_edge': v.image_size}, do_pad=True, **common)
        return Idefics3ImageProcessor(do_resize=True, size={'longest_edge': v.image_size}, do_image_splitting=False,
                                      max_image_size={'longest_edge': v.image_size}, do_pad=True, **common)
    if v.resize_shortest:  # shorter side, then the centre crop (CLIP)
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor(do_resize=True, size={'shortest_edge': v.resize_shortest}, do_center_crop=True,
                                  crop_size={'height': v.image_size, 'width': v.image_size}, **common)
    from transformers import SiglipImageProcessor
    return SiglipImageProcessor(do_resize=True, size={'height': v.image_size, 'width': v.image_size}, **common)


def text_config(d, tok):
    """A Llama (or, with q/k/v biases, Qwen2) config of glimpse's DecoderConfig."""
    return dict(model_type='qwen2' if d.qkv_bias else 'llama', vocab_size=d.vocab_size, hidden_size=d.n_embd,
                intermediate_size=d.intermediate_size, num_hidden_layers=d.n_layer, num_attention_heads=d.n_head,
                num_key_value_heads=d.n_kv_head, rms_norm_eps=d.norm_eps, rope_theta=d.rope_theta,
                tie_word_embeddings=d.tie_embeddings, hidden_act='silu', max_position_embeddings=8192,
                pad_token_id=tok.pad_id, bos_token_id=getattr(tok, 'bos_id', None), eos_token_id=tok.eot_id,
                # what llama.cpp's converter (convert_hf_to_gguf.py DIR) reads to pick its text model
                architectures=['Qwen2ForCausalLM' if d.qkv_bias else 'LlamaForCausalLM'])


def build_hf_model(model, tok, target):
    """The transformers model of a glimpse VLM, every tensor placed by name (strict: none left out)."""
    from transformers import AutoConfig, Idefics3Config, Idefics3ForConditionalGeneration, LlavaConfig, \
        LlavaForConditionalGeneration
    cfg = model.cfg
    family, vision, vision_state = vision_export(cfg.vision, model.vision_tower.state_dict())
    text = text_config(cfg.llm, tok)
    tied = cfg.llm.tie_embeddings
    if target == 'idefics3':
        config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=cfg.connector.scale_factor,
                                image_token_id=cfg.image_token_id, pad_token_id=tok.pad_id, tie_word_embeddings=tied)
        hf = Idefics3ForConditionalGeneration(config)
        parts = ((hf.model.vision_model, vision_state),
                 (hf.model.connector.modality_projection, {'proj.weight': model.connector.proj.weight}))
        lm = hf.model.text_model
    else:
        vc = AutoConfig.for_model(family + '_vision_model', **vision, **({'vision_use_head': False}
                                                                          if family == 'siglip' else {}))
        config = LlavaConfig(vision_config=vc, text_config=AutoConfig.for_model(**text), image_token_index=cfg.image_token_id,
                             projector_hidden_act='gelu', vision_feature_layer=-1, multimodal_projector_bias=True,
                             vision_feature_select_strategy='default' if family == 'clip' else 'full',
                             pad_token_id=tok.pad_id, tie_word_embeddings=tied)
        hf = LlavaForConditionalGeneration(config)
        vt = hf.model.vision_tower
        prefix = 'vision_model.' if any(k.startswith('vision_model.') for k in vt.state_dict()) else ''
        c = model.connector
        parts = ((vt, {prefix + k: t for k, t in vision_state.items()}),
                 (hf.model.multi_modal_projector, {'linear_1.weight': c.fc1.weight, 'linear_1.bias': c.fc1.bias,
                                                   'linear_2.weight': c.fc2.weight, 'linear_2.bias': c.fc2.bias}))
        lm = hf.model.language_model
    decoder = {k: v for k, v in model.llm.state_dict().items() if k != 'lm_head.weight'}
    with torch.no_grad():
        for module, state in parts + ((lm, decoder),):
            module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        if not tied:
            hf.lm_head.weight.copy_(model.llm.lm_head.weight)
    if tied:
        hf.tie_weights()
    return hf.eval()


def model_card(src, ckpt_path, target, run_config):
    """What the model is and was trained on, its test figure, and how to run it."""
    result = os.path.join(src, 'test_accuracy.json')
    figure = ''
    if os.path.exists(result):
        with open(result) as f:
            r = json.load(f)
        figure = f"- Test accuracy (glimpse): {r['accuracy'].get('all', 0):.1%} on {r['questions']} held-out questions\n"
    return (f"# {os.path.basename(os.path.normpath(src))}\n\n"
            f"A vision-language model trained with glimpse and exported by `python export.py` as a "
            f"{'Idefics3 (SmolVLM)' if target == 'idefics3' else 'LLaVA' if target == 'llava' else 'Hugging Face'} "
            f"model.\n\n- Trained on: `{run_config.get('data_dir')}` ({run_config.get('max_iters')} iterations; "
            f"checkpoint `{ckpt_path}`)\n{figure}\n## Use\n\n```python\nfrom transformers import "
            f"AutoModelForImageTextToText, AutoProcessor\nmodel = AutoModelForImageTextToText.from_pretrained(path)\n"
            f"processor = AutoProcessor.from_pretrained(path)\nmessages = [{{'role': 'user', 'content': "
            f"[{{'type': 'image'}}, {{'type': 'text', 'text': 'how many objects are there?'}}]}}]\n"
            f"text = processor.apply_chat_template(messages, add_generation_prompt=True)\n"
            f"inputs = processor(text=text, images=[[image]], return_tensors='pt')\n"
            f"print(processor.batch_decode(model.generate(**inputs, max_new_tokens=16)[:, inputs['input_ids'].shape[1]:],"
            f" skip_special_tokens=True))\n```\n\nglimpse reads it back with `sample.py --hf_vlm=<dir>`, "
            f"`classify.py --hf_model=<dir>`, and trains it again with `train_vlm.py --hf_vlm=<dir>`.\n")


def export(src, dst, checkpoint='ckpt.pt', trust_remote_code=False):
    """Write the Hugging Face directory dst for the run in src. Returns the target's name."""
    from transformers import GenerationConfig, Idefics3Processor, LlavaProcessor
    model, tok = load_run(src, 'cpu', checkpoint, trust_remote_code)
    model = merge_lora(model, dequantize=True).eval()
    run_config = torch.load(os.path.join(src, checkpoint), map_location='cpu', weights_only=True)['config']
    # everything that can refuse runs before dst is made: a refusal leaves no empty directory behind
    if isinstance(model, HFVLM):  # already a transformers model: its weights with the adapters folded in
        target, hf, processor = 'hf_vlm', model.model, tok.processor
    else:
        target = target_of(model.cfg, tok)
        end = '<end_of_utterance>' if target == 'idefics3' and isinstance(tok, Tokenizer) else '<|end|>'
        hf_tok = export_tokenizer(tok, end)
        hf = build_hf_model(model, tok, target)
        images = image_processor_config(model.cfg.vision, target, model.cfg.max_image_size)
        if target == 'idefics3':
            processor = Idefics3Processor(image_processor=images, tokenizer=hf_tok, image_seq_len=model.num_image_tokens,
                                          chat_template=hf_tok.chat_template)
        else:
            processor = LlavaProcessor(image_processor=images, tokenizer=hf_tok, patch_size=model.cfg.vision.patch_size,
                                       vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
                                       num_additional_image_tokens=int(model.cfg.vision.cls_token),
                                       chat_template=hf_tok.chat_template)
        hf.generation_config = GenerationConfig(eos_token_id=tok.eot_id, pad_token_id=tok.pad_id,
                                                bos_token_id=getattr(tok, 'bos_id', None), do_sample=False)
    os.makedirs(dst, exist_ok=True)
    hf.save_pretrained(dst)
    processor.save_pretrained(dst)
    with open(os.path.join(dst, 'README.md'), 'w') as f:
        f.write(model_card(src, checkpoint, target, run_config))
    return target


def export_gguf(src, dst, checkpoint='ckpt.pt', gguf_type='f32', force=False):
    """Write dst/model.gguf and dst/mmproj.gguf for the Idefics3 run in src. Refuses a run that stock llama.cpp
    would render differently from how it trained, unless force; returns what force let through (empty if none)."""
    check_gguf_type(gguf_type)
    model, tok = load_run(src, 'cpu', checkpoint)
    if isinstance(model, HFVLM):
        raise GlimpseError("export error: hf_vlm: a Hugging Face VLM's run; write its directory (python export.py RUN "
                           "DIR) and convert that with llama.cpp's convert_hf_to_gguf.py DIR, and DIR --mmproj")
    if target_of(model.cfg, tok) != 'idefics3':
        raise GlimpseError("export error: gguf: a LLaVA run; glimpse writes GGUF for Idefics3 runs "
                           "(connector='pixel_shuffle_linear', image_layout='idefics3')")
    check_tokenizer(tok)
    forced = llama_cpp_differences(model.cfg, tok, model.num_image_tokens)
    if forced and not force:
        raise GlimpseError(f"export error: gguf: {'; and '.join(forced)}; so llama.cpp would not answer as this run "
                           f"does. --gguf_force=True writes the files anyway, for inspection")
    model = merge_lora(model, dequantize=True).eval()
    cfg, name = model.cfg, os.path.basename(os.path.normpath(src))
    end = '<end_of_utterance>'  # the end-of-turn token's name in the Idefics3 export (export_tokenizer)
    state = build_hf_model(model, tok, 'idefics3').state_dict()
    text, vision = text_config(cfg.llm, tok), vision_export(cfg.vision, model.vision_tower.state_dict())[1]
    note = ('written with --gguf_force: stock llama.cpp does not run it as glimpse trained it: ' + '; '.join(forced)
            if forced else '')
    os.makedirs(dst, exist_ok=True)
    write_text_model(os.path.join(dst, 'model.gguf'), state, text, glimpse_vocab(tok, end, cfg.llm.vocab_size),
                     glimpse_chat_template(end), gguf_type, name, note)
    write_mmproj(os.path.join(dst, 'mmproj.gguf'), state, vision, cfg.connector.scale_factor, cfg.llm.n_embd,
                 cfg.vision.image_mean, cfg.vision.image_std, gguf_type, name, note, cfg.max_image_size)
    return forced


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    flags = dict(a[2:].partition('=')[::2] for a in sys.argv[1:] if a.startswith('--'))
    on = lambda key: flags.get(key) in ('', 'True')  # --gguf or --gguf=True
    if len(args) != 2 or set(flags) - {'checkpoint', 'trust_remote_code', 'gguf', 'gguf_type', 'gguf_force'} or \
            (('gguf_type' in flags or 'gguf_force' in flags) and not on('gguf')):
        raise SystemExit('usage: python export.py <out_dir> <export_dir> [--checkpoint=ckpt.pt] [--trust_remote_code] '
                         '| [--gguf [--gguf_type=f32|f16|q8_0] [--gguf_force=True]]')
    checkpoint = flags.get('checkpoint') or 'ckpt.pt'
    if on('gguf'):
        forced = export_gguf(args[0], args[1], checkpoint, flags.get('gguf_type') or 'f32', on('gguf_force'))
        print(f'wrote {args[1]}/model.gguf and {args[1]}/mmproj.gguf ({flags.get("gguf_type") or "f32"}), for '
              f'llama-mtmd-cli -m model.gguf --mmproj mmproj.gguf --jinja')
        if forced:
            print('FORCED (--gguf_force): stock llama.cpp will not answer as the run does: ' + '; and '.join(forced))
    else:
        # --trust_remote_code: a hf_vlm run whose model needs its own code (only for a model you trust)
        target = export(args[0], args[1], checkpoint, 'trust_remote_code' in flags)
        print(f'exported {args[0]} as {target} to {args[1]}: load it with AutoModelForImageTextToText and AutoProcessor')
