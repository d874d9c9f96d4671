"""
Everything that reads Hugging Face or GGUF weights: a source resolved to files on this machine (nothing is
downloaded), the name maps that load checkpoints into glimpse's native modules (every tensor used, every
shape checked), and wrappers for the models that have no native counterpart:

    load_pretrained_llm      a Llama-family LLM into model.Decoder, any other causal LM in HFCausalLM, with
                             its tokenizer (tokenizer.HFTokenizer)
    load_pretrained_vision   a SigLIP, CLIP or DINOv2 tower into model.VisionTower
    HFVLM                    a whole image-text-to-text model with its processor (train_vlm.py hf_vlm=)
    FrozenTextEncoder        a frozen text model's pooled features (train_siglip.py's frozen text towers)
"""
import base64
import itertools
import json
import math
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import GlimpseError
from model import (IGNORE_INDEX, ConnectorConfig, Decoder, DecoderConfig, VisionTower, ViTConfig, VLMConfig,
                   attention_mask)
from siglip import masked_mean
from tokenizer import HFProcessor, HFTokenizer


NATIVE_LLMS = ('llama', 'mistral', 'qwen2')  # Hugging Face model_type values whose layout Decoder implements


def resolve_pretrained(source):
    """A local directory, a .gguf file, or a model id in the Hugging Face cache -> (directory, gguf name or None).
    Nothing is downloaded."""
    if source.endswith('.gguf'):
        if not os.path.isfile(source):
            raise GlimpseError(f'pretrained error: GGUF file {source} not found')
        return os.path.dirname(os.path.abspath(source)), os.path.basename(source)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, 'config.json')):
            raise GlimpseError(f'pretrained error: {source} has no config.json; give a Hugging Face model directory '
                               f'(config.json + *.safetensors), a .gguf file, or a model id in the Hugging Face cache')
        return source, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        return snapshot_download(source, local_files_only=True), None
    except (LocalEntryNotFoundError, HFValidationError):
        raise GlimpseError(f"pretrained error: '{source}' is not a local directory, a .gguf file or a model in the Hugging "
                           f"Face cache, and glimpse downloads nothing; download it once on a connected machine with "
                           f"`hf download {source}` (the cache is ~/.cache/huggingface), or point to a local directory")


def is_native_llm(source):
    """Whether load_pretrained_llm gives source as the native Decoder (a Llama-family model_type, NATIVE_LLMS),
    read from its config alone (a GGUF file's metadata)."""
    from transformers import AutoConfig
    directory, gguf = resolve_pretrained(source)
    return AutoConfig.from_pretrained(directory, gguf_file=gguf).model_type in NATIVE_LLMS


def read_weights(directory, dtype=None, copy=()):
    """Every tensor of a Hugging Face model directory (model.safetensors, its shards, or pytorch_model.bin),
    memory-mapped: a tensor is a view of the file's pages, read from disk when first touched and shared through
    the page cache by every process that maps the file (the ranks of a node). dtype: a tensor stored in another
    dtype is converted, read on its own (safetensors' pread backend) so that the stored copy is never held
    beside the converted one (a bf16 checkpoint in float32: 1x its float32 bytes, not 1.5x). copy: names read
    that way too, into memory of their own (matrices the caller replaces, whose mapped pages would stay)."""
    from safetensors import safe_open
    index = os.path.join(directory, 'model.safetensors.index.json')
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.isfile(os.path.join(directory, 'model.safetensors')):
        files = ['model.safetensors']
    elif os.path.isfile(os.path.join(directory, 'pytorch_model.bin')):
        sd = torch.load(os.path.join(directory, 'pytorch_model.bin'), map_location='cpu', weights_only=True, mmap=True)
        return {k: v if dtype is None else v.to(dtype) for k, v in sd.items()}
    else:
        raise GlimpseError(f'pretrained error: no model.safetensors (or shards, or pytorch_model.bin) in {directory}')
    tensors = {}
    for name in files:
        path, convert = os.path.join(directory, name), []
        with safe_open(path, framework='pt') as f:  # memory-mapped
            for k in f.keys():
                t = f.get_tensor(k)  # a view of the mapping: nothing is read yet
                if k not in copy and (dtype is None or t.dtype == dtype):
                    tensors[k] = t
                else:
                    convert.append(k)
        if convert:
            with safe_open(path, framework='pt', backend='pread') as f:
                for k in convert:
                    tensors[k] = f.get_tensor(k) if dtype is None else f.get_tensor(k).to(dtype)
    return tensors


def decoder_config_from_hf(hf, source):
    """A Llama-family transformers config -> DecoderConfig; refuses what Decoder does not compute."""
    if hf.model_type not in NATIVE_LLMS:
        raise ValueError(f'{source}: model_type {hf.model_type!r} is not one of {NATIVE_LLMS}; use HFCausalLM')
    if hf.hidden_act != 'silu':
        raise ValueError(f"{source}: hidden_act {hf.hidden_act!r}; the native decoder's SwiGLU uses silu")
    # transformers 5 keeps theta and scaling in rope_parameters, earlier versions in rope_theta / rope_scaling
    rope = dict(getattr(hf, 'rope_parameters', None) or getattr(hf, 'rope_scaling', None) or {})
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type != 'default':
        raise ValueError(f"{source}: rope scaling '{rope_type}' is not implemented by the native decoder "
                         f"(only plain RoPE); this checkpoint cannot be loaded into it")
    n_head = hf.num_attention_heads
    head_dim = getattr(hf, 'head_dim', None) or hf.hidden_size // n_head
    if head_dim * n_head != hf.hidden_size:
        raise ValueError(f'{source}: head_dim {head_dim} x {n_head} heads != hidden_size {hf.hidden_size}; '
                         f'the native decoder needs head_dim = hidden_size / heads')
    # sliding-window attention (Mistral, some Qwen2) only differs beyond the window, far past glimpse's sequences
    return DecoderConfig(vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers, n_head=n_head,
                         n_kv_head=getattr(hf, 'num_key_value_heads', None) or n_head, n_embd=hf.hidden_size,
                         intermediate_size=hf.intermediate_size,
                         rope_theta=float(rope.get('rope_theta', getattr(hf, 'rope_theta', 10000.0))),
                         norm_eps=hf.rms_norm_eps, tie_embeddings=bool(hf.tie_word_embeddings),
                         qkv_bias=hf.model_type == 'qwen2' or bool(getattr(hf, 'attention_bias', False)))


def load_decoder(hf_config, state_dict, source):
    """Hugging Face Llama-family weights -> Decoder. Names map one to one after dropping the 'model.' prefix;
    every tensor must be used and every shape must match. The Decoder is built on the meta device and takes the
    tensors themselves (assign: no random model first, no copy; converted to float32 where they are not), so
    memory-mapped weights (read_weights) stay views of the file's pages until they are written to."""
    cfg = decoder_config_from_hf(hf_config, source)
    with torch.device('meta'):
        decoder = Decoder(cfg)
    sd = {k.removeprefix('model.'): v for k, v in state_dict.items() if not k.endswith('rotary_emb.inv_freq')}
    if cfg.tie_embeddings:  # tied checkpoints may or may not store the shared matrix twice
        sd.pop('lm_head.weight', None)
        if 'embed_tokens.weight' in sd:
            sd['lm_head.weight'] = sd['embed_tokens.weight']
    expected = decoder.state_dict()
    unused, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
    if unused or missing:
        raise ValueError(f'{source}: the weights do not fit the native decoder: unused {unused[:4]}'
                         f'{" ..." if len(unused) > 4 else ""}, missing {missing[:4]}{" ..." if len(missing) > 4 else ""}')
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f'{source}: {k} has shape {tuple(v.shape)}, the config says {tuple(expected[k].shape)}')
    decoder.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    if cfg.tie_embeddings:  # assign gave each name a Parameter of its own: tie them again
        decoder.lm_head.weight = decoder.embed_tokens.weight
    left = [k for k, t in itertools.chain(decoder.named_parameters(), decoder.named_buffers()) if t.is_meta]
    if left:  # a buffer that is not in the state dict (non-persistent) must be made, not left on meta
        raise ValueError(f'{source}: the native decoder left {left[:4]} on the meta device')
    return decoder


class HFCausalLM(nn.Module):
    """Any transformers causal LM (Phi, Gemma2, GPT-2, ...) behind Decoder's interface: forward from input
    embeddings with positions and a key mask, embed_tokens, lm_head(h) -> logits, new_cache() (the model's
    own Cache). hf_config: a config.to_dict(); model: the loaded model (else built from hf_config)."""

    def __init__(self, hf_config=None, model=None):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM
        if model is None:
            hf_config = dict(hf_config)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_config.pop('model_type'), **hf_config))
        self.model = model
        c = model.config.get_text_config(decoder=True)
        n_head = c.num_attention_heads
        # sizes only, for FLOP counts (approximate for non-SwiGLU MLPs)
        self.cfg = DecoderConfig(vocab_size=model.get_input_embeddings().weight.shape[0], n_layer=c.num_hidden_layers,
                                 n_head=n_head, n_kv_head=getattr(c, 'num_key_value_heads', None) or n_head,
                                 n_embd=c.hidden_size, intermediate_size=getattr(c, 'intermediate_size', None)
                                 or getattr(c, 'n_inner', None) or 4 * c.hidden_size,
                                 tie_embeddings=bool(getattr(c, 'tie_word_embeddings', False)))

    @property
    def embed_tokens(self):
        return self.model.get_input_embeddings()

    def lm_head(self, h):  # (..., C) -> (..., V), with Gemma-2's final logit soft-capping where the model has it
        logits = self.model.get_output_embeddings()(h)
        cap = getattr(self.model.config, 'final_logit_softcapping', None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.model.config)

    def forward(self, x, positions, key_valid, cache=None, segment_ids=None, right_padded=False, sample_ids=None):
        """As Decoder.forward: (B, T, C) embeddings -> (B, T, C) final hidden states. A right-padded training batch
        (right_padded, no cache, no isolated turns or packed samples) goes in without a mask: transformers then
        runs plain causal attention (is_causal, the flash kernels), exact for every real token, as Decoder does;
        otherwise transformers picks its attention path from the key mask."""
        if right_padded and cache is None and segment_ids is None and sample_ids is None:
            return self.model.base_model(inputs_embeds=x, attention_mask=None, position_ids=positions,
                                         use_cache=False).last_hidden_state
        mask = key_valid.long()
        # isolated turns, packed samples: a custom 4D additive mask, which transformers takes as it is (and so
        # ignores sliding windows, 4096 tokens in Gemma-2, far past glimpse's sequences)
        if segment_ids is not None or sample_ids is not None:
            allowed = attention_mask(key_valid, x.shape[1], segment_ids, sample_ids)  # (B, 1, T, S)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
        out = self.model.base_model(inputs_embeds=x, attention_mask=mask, position_ids=positions,
                                    past_key_values=cache, use_cache=cache is not None)
        return out.last_hidden_state


def mean_rows(weight, n_rows, new_ids):
    """(V, C) embedding or output matrix with n_rows rows; rows new_ids (tokens glimpse added) set to the mean
    of the original rows, so a new token starts as an average token rather than as noise. A matrix that has
    the rows already is changed in place (memory-mapped, only the pages of those rows are copied); a smaller
    one grows into a new matrix."""
    mean = weight.mean(0)
    out = weight if weight.shape[0] >= n_rows else \
        torch.cat([weight, weight.new_zeros(n_rows - weight.shape[0], weight.shape[1])])
    out[new_ids] = mean
    return out


def load_pretrained_llm(source, image_layout='plain', tile_markers=False):
    """A local directory, Hugging Face cache id or .gguf file -> (tokenizer, llm): an HFTokenizer with <image>
    added (and Idefics3's image markers: image_layout; its tile markers: tile_markers), and a Decoder (Llama family) or HFCausalLM (anything
    else) holding the weights in float32, its embedding (and untied output) matrix grown by the added tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    directory, gguf = resolve_pretrained(source)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(directory, gguf_file=gguf), image_layout, tile_markers)
    new_ids = tok.added_ids
    hf_model = None
    if gguf:  # transformers dequantises GGUF into a float model (and undoes llama.cpp's q/k permutation)
        hf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
        hf_config = hf_model.config
    else:
        hf_config = AutoConfig.from_pretrained(directory)
    if hf_config.model_type in NATIVE_LLMS:
        grown = ('model.embed_tokens.weight', 'lm_head.weight') if tok.vocab_size > hf_config.vocab_size else ()
        sd = dict(hf_model.state_dict() if hf_model is not None else read_weights(directory, torch.float32, grown))
        try:
            cfg = decoder_config_from_hf(hf_config, source)
            n = max(cfg.vocab_size, tok.vocab_size)
            for k in ('model.embed_tokens.weight', 'lm_head.weight'):
                if k in sd and not (cfg.tie_embeddings and k == 'lm_head.weight'):
                    sd[k] = mean_rows(sd[k], n, new_ids)  # float32 already (read_weights, or transformers')
            hf_config.vocab_size = n
            return tok, load_decoder(hf_config, sd, source)
        except ValueError as e:  # a checkpoint the native decoder cannot hold
            raise GlimpseError(f'pretrained error: {e}')
    if hf_model is None:
        hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    n = max(hf_model.get_input_embeddings().weight.shape[0], tok.vocab_size)
    untied = hf_model.get_output_embeddings().weight is not hf_model.get_input_embeddings().weight
    old_in = hf_model.get_input_embeddings().weight.detach().clone()
    old_out = hf_model.get_output_embeddings().weight.detach().clone() if untied else None
    hf_model.resize_token_embeddings(n, mean_resizing=False)
    with torch.no_grad():
        hf_model.get_input_embeddings().weight.copy_(mean_rows(old_in, n, new_ids))
        if untied:
            hf_model.get_output_embeddings().weight.copy_(mean_rows(old_out, n, new_ids))
    return tok, HFCausalLM(model=hf_model)


def hf_tokenizer_from_files(files, image_layout='plain', tile_markers=False):
    """A tokenizer saved by tokenizer.HFTokenizer.state() (file name -> base64 contents) -> HFTokenizer. The
    names come from a checkpoint: only plain file names are written, into a fresh temporary folder."""
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            if not isinstance(name, str) or name in ('', '.', '..') or os.path.basename(name) != name or '\\' in name:
                raise GlimpseError(f'checkpoint error: its tokenizer holds a file named {name!r}, which is not a plain '
                                   f'file name; the checkpoint is damaged or crafted, do not use it')
            with open(os.path.join(d, name), 'wb') as f:
                f.write(base64.b64decode(data))
        return HFTokenizer(AutoTokenizer.from_pretrained(d), image_layout, tile_markers)


class HFVLM(nn.Module):
    """A Hugging Face image-text-to-text model (SmolVLM / Idefics3, Qwen2-VL, ...) behind the interface
    train_vlm.py uses: forward(**batch) -> the summed cross-entropy of the supervised targets (as VLM.forward),
    chat(), param_counts(), vision_tower and llm (the parts the training modes apply to) and cfg (sizes only,
    for FLOP counts). Weights are held in float32 (autocast lowers them), as load_pretrained_llm's."""
    num_image_tokens = None  # per image, as the processor expands it (train_vlm.py counts them per batch)

    def __init__(self, source, trust_remote_code=False):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor
        directory, gguf = resolve_pretrained(source)
        if gguf:
            raise GlimpseError(f'pretrained error: hf_vlm={source} is a .gguf file; give a Hugging Face VLM directory')
        try:
            processor = AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)
            self.model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32,
                                                                     trust_remote_code=trust_remote_code)
        except (ValueError, OSError) as e:  # not an image-text-to-text model, or code it would have to run
            first = (str(e).strip().splitlines() or [''])[0][:200]
            raise GlimpseError(f'pretrained error: cannot load {source} as an image-text-to-text model with its '
                               f'processor ({type(e).__name__}: {first})')
        self.processor = HFProcessor(processor, source)
        if self.vision_tower is self.model or self.llm is self.model:
            raise GlimpseError(f'pretrained error: cannot tell the vision tower and language model of {source} apart')
        self.cfg = hf_vlm_sizes(self.model.config, self.processor.image_token_id)

    # properties, not attributes: the parts stay reachable through self.model only (one name per tensor)
    @property
    def vision_tower(self):
        return self.model.get_encoder('image')

    @property
    def llm(self):
        return self.model.get_decoder()

    def param_counts(self):
        count = lambda m: sum(p.numel() for p in m.parameters())
        vision, llm, total = count(self.vision_tower), count(self.llm), count(self)
        return {'vision_tower': vision, 'llm': llm, 'other': total - vision - llm, 'total': total}

    def forward(self, input_ids, attention_mask=None, targets=None, **inputs):
        """inputs: what the processor made of the images (pixel_values, ...). With targets: the summed
        cross-entropy over supervised positions (the caller normalises); without: logits (B, T, V)."""
        h = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                  **inputs).last_hidden_state  # (B, T, C)
        head = self.model.get_output_embeddings()
        if targets is None:
            return head(h)
        supervised = targets != IGNORE_INDEX
        logits = head(h[supervised]).float()  # only where there is a loss: (n, V)
        return F.cross_entropy(logits, targets[supervised], reduction='sum')

    @torch.no_grad()
    def chat(self, processor, images, prompts, max_new_tokens=32, system='', temperature=0.0, top_k=None,
             top_p=None, generator=None):
        """As VLM.chat: one prompt per image (uint8 arrays or PIL images) -> answers, via the model's generate().
        Sampling draws from the global RNG (transformers takes no generator)."""
        import numpy as np
        from PIL import Image
        device = next(self.parameters()).device
        head = [{'role': 'system', 'content': [{'type': 'text', 'text': system}]}] if system else []
        texts = [processor.render(head + processor.messages([{'role': 'user', 'content': p}]), True) for p in prompts]
        pil = [[im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))] for im in images]
        processor.tokenizer.padding_side = 'left'
        batch = processor.processor(text=texts, images=pil, return_tensors='pt', padding=True).to(device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0) \
            if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=processor.pad_id, **sampling)
        return [t.strip() for t in processor.tokenizer.batch_decode(out[:, batch['input_ids'].shape[1]:],
                                                                    skip_special_tokens=True)]


def hf_vlm_sizes(config, image_token_id):
    """A VLMConfig summarising a Hugging Face VLM's sizes, for training_flops_per_sample only (approximate:
    one image crop, an MLP connector); the model itself is config['hf_vlm']."""
    t, v = config.get_text_config(decoder=True), config.vision_config
    width = getattr(v, 'embed_dim', None) or v.hidden_size  # Qwen2-VL: embed_dim (its hidden_size is the output)
    heads = getattr(v, 'num_heads', None) or v.num_attention_heads
    mlp = getattr(v, 'intermediate_size', None)
    vision = ViTConfig(image_size=getattr(v, 'image_size', v.patch_size), patch_size=v.patch_size,
                       n_layer=getattr(v, 'depth', None) or v.num_hidden_layers, n_head=heads, n_embd=width,
                       mlp_ratio=mlp / width if mlp else getattr(v, 'mlp_ratio', 4.0), source=config.name_or_path)
    llm = DecoderConfig(vocab_size=t.vocab_size, n_layer=t.num_hidden_layers, n_head=t.num_attention_heads,
                        n_kv_head=getattr(t, 'num_key_value_heads', None) or t.num_attention_heads,
                        n_embd=t.hidden_size, intermediate_size=getattr(t, 'intermediate_size', 4 * t.hidden_size))
    return VLMConfig(vision=vision, connector=ConnectorConfig(kind='mlp', in_dim=width, out_dim=t.hidden_size),
                     llm=llm, image_token_id=image_token_id)


VISION_FAMILIES = {'siglip_vision_model': 'siglip', 'clip_vision_model': 'clip', 'dinov2': 'dinov2',
                   'dinov2_with_registers': 'dinov2'}
HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
                  'quick_gelu': 'quick_gelu'}


def image_preprocessing(model_dir):
    """The ViTConfig fields of the checkpoint's preprocessor_config.json: size, resize mode, mean/std."""
    path = os.path.join(model_dir, 'preprocessor_config.json')
    if not os.path.exists(path):
        raise GlimpseError(f'vision error: {path} not found; the tower needs it for image size, resizing and '
                           f'mean/std (save the model\'s image processor there with save_pretrained)')
    with open(path) as f:
        p = json.load(f)
    side = lambda v: v if isinstance(v, int) else v.get('height', v.get('shortest_edge'))
    if p.get('do_rescale', True) and abs(p.get('rescale_factor', 1 / 255) - 1 / 255) > 1e-9:
        raise GlimpseError(f"vision error: {path}: rescale_factor {p['rescale_factor']} (glimpse expects 1/255)")
    resample = {2: 'bilinear', 3: 'bicubic'}.get(p.get('resample', 3))
    if resample is None:
        raise GlimpseError(f"vision error: {path}: resample={p['resample']}; glimpse resizes bilinear (2) or bicubic (3)")
    size, crop = p.get('size', 224), p.get('crop_size')
    out = dict(resample=resample)
    if p.get('do_center_crop') and crop is not None:  # shorter side to size, then the centre crop (CLIP, DINOv2)
        out.update(image_size=side(crop), resize_shortest=side(size))
    elif isinstance(size, dict) and 'shortest_edge' in size:
        raise GlimpseError(f'vision error: {path}: shortest_edge resize without a center crop gives images of '
                           f'varying shape; glimpse needs a fixed size')
    else:  # both sides to size (SigLIP)
        out.update(image_size=side(size))
    if p.get('do_normalize', True):
        out.update(image_mean=tuple(p['image_mean']), image_std=tuple(p['image_std']))
    else:
        out.update(image_mean=(0.0, 0.0, 0.0), image_std=(1 / 255,) * 3)  # pixels as 0..1 * 255 / 255
    return out


def interpolate_positions(pos, grid, antialias):
    """(1, g*g, C) position table -> (1, grid*grid, C), bicubic on the 2D grid, in fp32 as DINOv2 does."""
    g, C = int(math.isqrt(pos.shape[1])), pos.shape[2]
    x = pos.reshape(1, g, g, C).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode='bicubic', align_corners=False, antialias=antialias)
    return x.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, C)


def blocks_kept(layer, n_layer, source):
    """How many blocks of an n_layer tower vision_layer keeps: -1 all, -2 all but the last, k > 0 the first k."""
    n_keep = layer if layer > 0 else n_layer + 1 + layer
    if not 1 <= n_keep <= n_layer:
        raise GlimpseError(f'vision error: vision_layer={layer} but {source} has {n_layer} blocks '
                           f'(use -{n_layer}..-1 or 1..{n_layer})')
    return n_keep


def vision_name_map(family, n_layer, n_registers=0, last=True):
    """The native name -> checkpoint name(s) of every tensor of a SigLIP, CLIP or DINOv2 tower of n_layer blocks
    (q, k, v: a list, concatenated into the native qkv), in both directions: load_pretrained_vision reads
    checkpoints with it, export.py writes them. last: the tower ends with the checkpoint's final LayerNorm.
    Returns (map, the checkpoint's prefix of block i's names, checkpoint tensors no native one needs)."""
    if family == 'dinov2':
        m = {'patch_embed.weight': 'embeddings.patch_embeddings.projection.weight',
             'patch_embed.bias': 'embeddings.patch_embeddings.projection.bias',
             'cls_token': 'embeddings.cls_token', 'pos_embed': 'embeddings.position_embeddings'}
        if n_registers:
            m['registers'] = 'embeddings.register_tokens'
        if last:
            m.update({'ln_post.weight': 'layernorm.weight', 'ln_post.bias': 'layernorm.bias'})
        block = {'ln1': 'norm1', 'ln2': 'norm2', 'proj': 'attention.output.dense', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2',
                 'qkv': ['attention.attention.query', 'attention.attention.key', 'attention.attention.value']}
        layers, unused = 'encoder.layer', ('embeddings.mask_token',)  # mask_token: for masked-image pretraining
    else:
        m = {'patch_embed.weight': 'embeddings.patch_embedding.weight',
             'pos_embed': 'embeddings.position_embedding.weight'}
        if family == 'siglip':
            m['patch_embed.bias'] = 'embeddings.patch_embedding.bias'
            if last:
                m.update({'ln_post.weight': 'post_layernorm.weight', 'ln_post.bias': 'post_layernorm.bias'})
        else:
            m.update({'cls_token': 'embeddings.class_embedding', 'ln_pre.weight': 'pre_layrnorm.weight',
                      'ln_pre.bias': 'pre_layrnorm.bias'})
        block = {'ln1': 'layer_norm1', 'ln2': 'layer_norm2', 'proj': 'self_attn.out_proj', 'fc1': 'mlp.fc1',
                 'fc2': 'mlp.fc2', 'qkv': ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj']}
        # SigLIP's attention-pooling head and CLIP's post_layernorm make the pooled output only
        layers, unused = 'encoder.layers', ('head.', 'post_layernorm.')
    for i in range(n_layer):
        for nat, src in block.items():
            for w in ('weight', 'bias'):
                m[f'blocks.{i}.{nat}.{w}'] = [f'{layers}.{i}.{s}.{w}' for s in src] if isinstance(src, list) \
                    else f'{layers}.{i}.{src}.{w}'
        if family == 'dinov2':
            m[f'blocks.{i}.ls1'] = f'{layers}.{i}.layer_scale1.lambda1'
            m[f'blocks.{i}.ls2'] = f'{layers}.{i}.layer_scale2.lambda1'

    return m, layers, unused


def pretrained_vision_config(source, layer=-1, keep_cls=False):
    """(ViTConfig, directory, Hugging Face config) of a SigLIP, CLIP or DINOv2 vision tower (or the vision half of a CLIPModel /
    SiglipModel), from its config.json and preprocessor_config.json alone: no weights are read. layer and
    keep_cls as load_pretrained_vision takes them."""
    model_dir, gguf = resolve_pretrained(source)
    if gguf:
        raise GlimpseError(f'vision error: {source} is a GGUF file; vision= takes a SigLIP, CLIP or DINOv2 directory')
    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained(model_dir)
    hf = getattr(hf, 'vision_config', hf)  # CLIPModel / SiglipModel: the vision half
    family = VISION_FAMILIES.get(hf.model_type)
    if family is None:
        raise GlimpseError(f"vision error: {model_dir}/config.json is a '{hf.model_type}' model; vision= takes "
                           f"SigLIP, CLIP or DINOv2 checkpoints ({', '.join(VISION_FAMILIES)})")
    if family == 'dinov2' and getattr(hf, 'use_swiglu_ffn', False):
        raise GlimpseError(f'vision error: {model_dir}: DINOv2 with a SwiGLU MLP (giant) is not supported')
    if hf.hidden_act not in HF_ACTIVATIONS:
        raise GlimpseError(f"vision error: {model_dir}: activation '{hf.hidden_act}' is not supported")
    L = hf.num_hidden_layers
    n_keep = blocks_kept(layer, L, source)
    last = n_keep == L
    C = hf.hidden_size
    mlp = hf.intermediate_size if family != 'dinov2' else round(C * hf.mlp_ratio)
    cls = family != 'siglip'
    cfg = ViTConfig(patch_size=hf.patch_size, n_layer=n_keep, n_head=hf.num_attention_heads, n_embd=C,
                    mlp_ratio=mlp / C, norm_eps=hf.layer_norm_eps, act=HF_ACTIVATIONS[hf.hidden_act],
                    patch_bias=family != 'clip', cls_token=cls, n_registers=getattr(hf, 'num_register_tokens', 0),
                    pre_norm=family == 'clip', post_norm=last and family != 'clip',
                    layer_scale=1.0 if family == 'dinov2' else 0.0, keep_cls=keep_cls and cls,
                    source=os.path.abspath(source) if model_dir == source else f'{source} ({model_dir})', **image_preprocessing(model_dir))
    if keep_cls and not cls:
        raise GlimpseError(f'vision error: vision_cls=True but {source} ({family}) has no class token')
    return cfg, model_dir, hf


def load_pretrained_vision(source, layer=-1, keep_cls=False):
    """A SigLIP, CLIP or DINOv2 vision tower (or the vision half of a CLIPModel / SiglipModel) from a local
    directory or a model id in the Hugging Face cache, as (ViTConfig, state_dict of VisionTower).
    layer: whose output feeds the connector, as an index into Hugging Face's hidden_states (-1: the
    last block, with the final LayerNorm SigLIP and DINOv2 apply to last_hidden_state; -2: the
    penultimate block's raw output, as LLaVA takes from CLIP). The blocks after it are not built."""
    cfg, model_dir, hf = pretrained_vision_config(source, layer, keep_cls)
    family, C, cls, L, n_keep = VISION_FAMILIES[hf.model_type], cfg.n_embd, cfg.cls_token, hf.num_hidden_layers, cfg.n_layer
    last = n_keep == L
    tensors = read_weights(model_dir)
    prefix = next((p for p in ('vision_model.', 'dinov2.', 'dinov2_with_registers.', '')
                   if f'{p}embeddings.patch_embedding.weight' in tensors
                   or f'{p}embeddings.patch_embeddings.projection.weight' in tensors), None)
    if prefix is None:
        raise GlimpseError(f'vision error: no patch embedding among the tensors in {model_dir}; not a {family} checkpoint?')
    m, layers, unused = vision_name_map(family, n_keep, cfg.n_registers, last)
    with torch.device('meta'):
        expected = VisionTower(cfg).state_dict()
    state, used = {}, set()
    for nat, src in m.items():
        names = [prefix + s for s in (src if isinstance(src, list) else [src])]
        for n in names:
            if n not in tensors:
                raise GlimpseError(f'vision error: tensor {n} (for {nat}) not found in {model_dir}')
        used.update(names)
        t = torch.cat([tensors[n] for n in names]) if len(names) > 1 else tensors[names[0]]
        if nat == 'cls_token':
            t = t.reshape(1, 1, C)
        elif nat == 'pos_embed':
            t = t.reshape(1, -1, C)
            grid = cfg.image_size // cfg.patch_size
            if t.shape[1] != grid * grid + cls:  # DINOv2: trained at 518 px, used at 224
                head = t[:, :int(cls)]
                t = torch.cat([head, interpolate_positions(t[:, int(cls):], grid,
                                                           hf.model_type == 'dinov2_with_registers')], dim=1)
        if tuple(t.shape) != tuple(expected[nat].shape):
            raise GlimpseError(f'vision error: {names[0]} in {model_dir} has shape {tuple(t.shape)}, the native '
                               f'{nat} needs {tuple(expected[nat].shape)}')
        state[nat] = t.float().contiguous()
    if set(state) != set(expected):
        raise GlimpseError(f'vision error: no checkpoint tensor for {sorted(set(expected) - set(state))}')
    beyond = tuple(f'{prefix}{layers}.{i}.' for i in range(n_keep, L))  # blocks after the selected layer
    left = [k for k in tensors if k.startswith(prefix) and k not in used and not k.startswith(beyond)
            and not k[len(prefix):].startswith(unused + (('layernorm.',) if family == 'dinov2' and not last else ()))]
    if left:
        raise GlimpseError(f'vision error: {len(left)} tensors of {model_dir} not mapped, e.g. {left[0]}')
    return cfg, state


class FrozenTextEncoder:
    """A pretrained text model, frozen: the mean of its hidden states over the real tokens.
    path: a local transformers dir (e.g. all-MiniLM-L6-v2) or a .gguf file (e.g. SmolLM2; transformers
    dequantizes it). Loaded with AutoModel, so a causal LM comes without its LM head.
    An encoder (BERT-like) is pooled at its last layer, as sentence encoders are trained to be. A causal
    LM is pooled at its middle layer, leaving out the first token: the last layers are shaped for
    predicting the next token, and the first token is where attention sinks, with a hidden state ~100x
    larger than the others that swamps a mean. On shapes captions (SmolLM2, class-mean probe): last layer
    with every token 80% shape / 63% colour; middle layer without the first token 100% / 100%.
    layer: a hidden_states index to use instead (0 = the default above; -1 = the last layer)."""

    def __init__(self, path, device='cpu', layer=0):
        from transformers import AutoModel, AutoTokenizer
        path, gguf = resolve_pretrained(path)
        kw = {'gguf_file': gguf} if gguf else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        if self.tokenizer.pad_token is None:  # Llama-style tokenizers have none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = 'right'
        self.model = AutoModel.from_pretrained(path, **kw).to(device).eval().requires_grad_(False)
        cfg = self.model.config
        # a GGUF file holds a language model; its config names no architectures
        self.causal = bool(gguf) or any(a.endswith('ForCausalLM') for a in cfg.architectures or []) or \
            getattr(cfg, 'is_decoder', False)
        self.layer = layer or (cfg.num_hidden_layers // 2 if self.causal else -1)
        blocks = getattr(self.model, 'layers', None)  # a decoder's blocks (Llama-style models)
        if self.layer > 0 and isinstance(blocks, nn.ModuleList) and self.layer + 1 < len(blocks):
            # the blocks after the pooled layer never change it: drop them (SmolLM2 at layer 15: 2x faster).
            # One more is kept: transformers returns the last hidden state after the final norm.
            self.model.layers = blocks[:self.layer + 1]
        self.dim = cfg.hidden_size
        self.device = device

    @torch.no_grad()
    def __call__(self, texts, batch_size=64):  # list of str -> (N, dim) float32
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        out = torch.empty(len(texts), self.dim)
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, return_tensors='pt').to(self.device)
            h = self.model(**enc, output_hidden_states=True).hidden_states[self.layer]  # (B, T, dim)
            mask = enc['attention_mask'].bool()
            if self.causal:  # drop the attention sink, except from a text of one token (a mean needs one)
                mask[:, 0] &= mask.sum(1) == 1
            out[idx] = masked_mean(h.float(), mask).cpu()
        return out
