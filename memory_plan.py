"""
The memory plan before renting GPUs (python bench.py CONFIG --plan): per-GPU bytes of a train_vlm.py config's
weights, gradients, optimizer state and activations under DDP and FSDP (sharding.py) on 1, 4 and 8 GPUs, which of
24, 40 and 80 GB cards each setting fits, and the largest per-GPU batch that fits.

Nothing is downloaded and no weight is read. The model is built on the meta device from its architecture: the
config files of a pretrained model on disk, else KNOWN_ARCHITECTURES (the config.json of public checkpoints). The
weights, gradients and optimizer state are counted from its parameters and what trains; the activations are the
tensors autograd keeps for backward in one training forward, traced on the meta device (so every row is
max_seq_len tokens long and every text token is supervised: the worst batch), at batch 1 and 2 and scaled.
"""
import glob
import json
import os
import tempfile
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from checkpoint import ModelSpec, apply_modes, vlm_config
from configurator import apply_config, script_defaults
from errors import GlimpseError
from lora import LoRALinear
from model import VLM, ViTConfig
from optim import is_hidden_matrix
from pretrained import (NATIVE_LLMS, HFCausalLM, decoder_config_from_hf, pretrained_vision_config,
                        resolve_pretrained)

GiB = 2 ** 30
CARDS = (24, 40, 80)  # GB of the usual cards: RTX 4090 / L4 / A10G, A100 40GB, A100 80GB / H100
GPUS = (1, 4, 8)
HEADROOM, CONTEXT = 1.10, 1.0  # fits: counted bytes x 1.10 (allocator, transient buffers) + 1 GiB (CUDA context)

# The architectures of public checkpoints, as the config.json (and preprocessor_config.json) of each on the Hugging
# Face Hub gives them (huggingface.co/<id>/blob/main/config.json), the fields glimpse reads: the plan of a config
# that names one builds it from these when it is not on disk.
_SIGLIP_PRE = dict(do_resize=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)
_CENTER_CROP = dict(do_resize=True, do_center_crop=True, do_normalize=True, resample=3)
KNOWN_ARCHITECTURES = {
    'google/siglip-so400m-patch14-384': (  # the vision half of the SiglipModel
        dict(model_type='siglip_vision_model', hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
             num_attention_heads=16, patch_size=14, image_size=384, hidden_act='gelu_pytorch_tanh',
             layer_norm_eps=1e-6),
        dict(_SIGLIP_PRE, size={'height': 384, 'width': 384})),
    'facebook/dinov2-large': (
        dict(model_type='dinov2', hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
             patch_size=14, image_size=518, hidden_act='gelu', layer_norm_eps=1e-6, layerscale_value=1.0,
             use_swiglu_ffn=False),
        dict(_CENTER_CROP, size={'shortest_edge': 256}, crop_size={'height': 224, 'width': 224},
             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])),
    'openai/clip-vit-base-patch16': (  # the vision half of the CLIPModel
        dict(model_type='clip_vision_model', hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, patch_size=16, image_size=224, hidden_act='quick_gelu', layer_norm_eps=1e-5),
        dict(_CENTER_CROP, size=224, crop_size=224, image_mean=[0.48145466, 0.4578275, 0.40821073],
             image_std=[0.26862954, 0.26130258, 0.27577711])),
    'microsoft/phi-2': dict(
        model_type='phi', vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.4, hidden_act='gelu_new',
        layer_norm_eps=1e-5, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False),
    'google/gemma-2-2b': dict(
        model_type='gemma2', vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation='gelu_pytorch_tanh',
        rms_norm_eps=1e-6, max_position_embeddings=8192, rope_theta=10000.0, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True,
        pad_token_id=0),
    **{name: dict(model_type='gpt2', vocab_size=50257, n_positions=1024, n_embd=C, n_layer=L, n_head=H)
       for name, C, L, H in (('gpt2', 768, 12, 12), ('gpt2-medium', 1024, 24, 16), ('gpt2-large', 1280, 36, 20),
                             ('gpt2-xl', 1600, 48, 25))},
}


def _architecture_dir(source, tmp):
    """A directory with source's config.json (and preprocessor_config.json): its own, on disk or in the Hugging Face
    cache, or one written into tmp from KNOWN_ARCHITECTURES. Returns (directory, note or '')."""
    try:
        return resolve_pretrained(source)[0], ''
    except GlimpseError:
        if source not in KNOWN_ARCHITECTURES:
            raise GlimpseError(f"plan error: {source} is not on disk and its architecture is not in "
                               f"memory_plan.KNOWN_ARCHITECTURES; download its config.json (hf download {source} "
                               f"config.json preprocessor_config.json) or add it there")
    known = KNOWN_ARCHITECTURES[source]
    d = os.path.join(tmp, source.replace('/', '--'))
    os.makedirs(d)
    files = known if isinstance(known, tuple) else (known,)  # a tower's: config and preprocessor config
    for name, content in zip(('config.json', 'preprocessor_config.json'), files):
        with open(os.path.join(d, name), 'w') as f:
            json.dump(content, f)
    return d, f'{source}: not on disk, its architecture from memory_plan.KNOWN_ARCHITECTURES'


def _run_config(out_dir, script):
    """The config an absent run directory was (or will be) made with: config/*.py whose out_dir it is, over the
    script's defaults; None if no config names it."""
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', '*.py'))):
        made = {}
        exec(compile(open(path).read(), path, 'exec'), {}, made)
        if made.get('out_dir') == out_dir:
            return path, apply_config([path], dict(script_defaults(script)))
    return None


def _tower(spec, tmp):
    """(ViTConfig or None for the vit_* keys, note) of the vision tower spec names, with no weights read: an
    earlier run's, the ViT a config will train into that directory (train_siglip.py's keys), or a pretrained one."""
    if spec.vision == 'scratch':
        return None, ''
    if os.path.isfile(os.path.join(spec.vision, 'ckpt.pt')):
        return spec.tower_config(), ''
    made = _run_config(spec.vision, 'train_siglip.py')
    if made:
        path, c = made
        return ViTConfig(image_size=c['image_size'], patch_size=c['patch_size'], patch_overlap=c['patch_overlap'],
                         n_layer=c['vit_layers'], n_head=c['vit_heads'], n_embd=c['vit_width']), \
            f'vision={spec.vision}: not trained yet, the ViT {os.path.relpath(path)} trains'
    directory, note = _architecture_dir(spec.vision, tmp)
    return pretrained_vision_config(directory, spec.vision_layer, spec.vision_cls)[0], note


def _language_model(spec, tmp):
    """(LLM module on the meta device or None for the llm_* keys, note)."""
    if spec.llm == 'scratch':
        return None, ''
    if os.path.isfile(os.path.join(spec.llm, 'ckpt.pt')):
        raise GlimpseError(f'plan error: llm={spec.llm} is a glimpse run; plan the config it was trained with')
    from transformers import AutoConfig, AutoModelForCausalLM
    directory, note = _architecture_dir(spec.llm, tmp)
    hf = AutoConfig.from_pretrained(directory)
    if hf.model_type in NATIVE_LLMS:
        from model import Decoder
        return Decoder(decoder_config_from_hf(hf, spec.llm)), note
    return HFCausalLM(model=AutoModelForCausalLM.from_config(hf)), note


def plan_model(config):
    """The model a train_vlm.py config trains, on the meta device, with its modes applied (QLoRA as LoRA over
    weights counted at 4 bits). Returns (model, spec, quantized parameter names, notes)."""
    spec = ModelSpec.from_config(config)
    if spec.hf_vlm:
        raise GlimpseError('plan error: hf_vlm runs are not planned (fsdp shards glimpse\'s own VLM); bench.py '
                           'without --plan measures one')
    notes = []
    if spec.init_from not in ('scratch', 'resume'):
        notes.append(f'init_from={spec.init_from}: planned from this config\'s vision, connector and llm keys')
    with tempfile.TemporaryDirectory() as tmp, torch.device('meta'):
        tower, note = _tower(spec, tmp)
        notes += [note] if note else []
        llm, note = _language_model(spec, tmp)
        notes += [note] if note else []
        vocab = 4096 if llm is None else llm.cfg.vocab_size  # a word vocabulary's size depends on the data
        if llm is None:
            notes.append('llm=scratch: a vocabulary of 4096 words assumed')
        cfg = vlm_config(spec, SimpleNamespace(vocab_size=vocab, image_token_id=0), llm, tower)
        cfg = replace(cfg, connector=replace(cfg.connector, out_norm=False))  # its init reads weights; 1 vector
        model = VLM(cfg, llm=llm)
        lora = {m: 'lora' if m == 'qlora' else m for m in (spec.vision_mode, spec.llm_mode)}
        apply_modes(model, replace(spec, vision_mode=lora[spec.vision_mode], llm_mode=lora[spec.llm_mode],
                                   grad_checkpointing=False, dtype='float32'))
    quantized = set()
    for part, mode in (('vision_tower', spec.vision_mode), ('llm', spec.llm_mode)):
        if mode == 'qlora':
            quantized |= {f'{part}.{n}.base.weight' for n, m in getattr(model, part).named_modules()
                          if isinstance(m, LoRALinear)}
    return model, spec, quantized, notes


class _FlashLike(torch.autograd.Function):
    """What a flash or memory-efficient attention kernel keeps for backward (FlashAttention-2, Dao 2023): q, k, v,
    the output and a float32 log-sum-exp per query, no (T, T) matrix; an explicit mask too. The meta device would
    run SDPA's math path, which keeps the attention probabilities; CUDA runs these kernels."""

    @staticmethod
    def forward(ctx, q, k, v, mask):  # q (B, H, T, hd); the output laid out (B, T, H, hd), as the kernels write it
        B, H, T = q.shape[:3]
        out = q.new_empty(B, T, H, v.shape[-1]).transpose(1, 2)
        lse = q.new_empty(B, H, T, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError('traced for its saved tensors only')


def _flash_like_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashLike.apply(q, k, v, attn_mask)


def saved_for_backward(model, batch, seq_len, dtype, quantized=()):
    """Bytes autograd keeps for backward in one training forward of `batch` rows of seq_len tokens (image tokens
    first, every text token supervised), traced on the meta device in dtype: {'vision', 'llm_blocks' (a list, one
    per decoder block), 'rest', and the parameters saved, 'weights' outside the decoder blocks and 'block_weights'
    (a list) in them: under autocast, bf16 copies of the fp32 weights (quantized ones, which bitsandbytes
    dequantises again in backward, are not counted)}."""
    from sharding import decoder_blocks
    model = model.to(dtype)
    params = dict(model.named_parameters())
    weights = {p.untyped_storage()._cdata for n, p in params.items() if n not in quantized}
    seen = {params[n].untyped_storage()._cdata: 0 for n in quantized}
    blocks = {id(b): ('vision', None) for b in model.vision_tower.blocks}
    blocks.update({id(b): ('llm_blocks', i) for i, b in enumerate(decoder_blocks(model.llm))})
    where = [('rest', None)]
    n_blocks = sum(t == 'llm_blocks' for t, _ in blocks.values())
    out = {'vision': 0, 'llm_blocks': [0] * n_blocks, 'rest': 0, 'weights': 0, 'block_weights': [0] * n_blocks}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen[key] = n = t.untyped_storage().nbytes()
            tag, i = where[-1]
            if key in weights:
                tag, i = ('block_weights', i) if tag == 'llm_blocks' else ('weights', None)
            if i is None:
                out[tag] += n
            else:
                out[tag][i] += n
        return t

    def enter(module, args):
        where.append(blocks[id(module)])

    def leave(module, args, output):
        where.pop()

    inside = [m for m in model.modules() if id(m) in blocks]
    hooks = [m.register_forward_pre_hook(enter) for m in inside] + [m.register_forward_hook(leave) for m in inside]
    # on the meta device: SDPA as CUDA runs it (_FlashLike); autocast asked about the meta device
    # (lora.LoRALinear) answers no: the trace runs in dtype throughout, as autocast would compute
    sdpa = F.scaled_dot_product_attention
    if next(model.parameters()).is_meta:
        F.scaled_dot_product_attention = _flash_like_sdpa
    autocast_enabled = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda *device: False if device == ('meta',) else autocast_enabled(*device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _training_forward(model, batch, seq_len, dtype)
    finally:
        F.scaled_dot_product_attention, torch.is_autocast_enabled = sdpa, autocast_enabled
        for h in hooks:
            h.remove()
    return out


def _training_forward(model, B, T, dtype):
    """VLM.forward's work on a full batch (right-padded rows with no padding, so no mask; the head on the
    supervised text tokens), without its checks that read values, which the meta device has not. On the device
    of the model's parameters."""
    torch_device = torch.device(next(model.parameters()).device)
    with torch_device:
        return _forward_on_device(model, B, T, dtype)


def _forward_on_device(model, B, T, dtype):
    v = model.cfg.vision
    trains = any(p.requires_grad for p in model.vision_tower.parameters())
    with torch.set_grad_enabled(trains):  # a frozen tower runs without autograd (VLM.image_embeddings)
        features = model.vision_tower.features(torch.zeros(B, 3, v.image_size, v.image_size, dtype=dtype))
    n_text = T if model.bridge else T - model.num_image_tokens
    x = model.llm.embed_tokens(torch.zeros(B, n_text, dtype=torch.long))
    if model.bridge:
        x = model.connector(x, features)
    else:
        x = torch.cat([model.connector(features).to(x.dtype), x], dim=1)
    positions = torch.arange(T).expand(B, T)
    if isinstance(model.llm, HFCausalLM):  # no mask: transformers then takes its causal kernel, as for full rows
        h = model.llm.model.base_model(inputs_embeds=x, position_ids=positions).last_hidden_state
    else:
        h = model.llm(x, positions, torch.ones(B, T, dtype=torch.bool), right_padded=True)
    logits = model.llm.lm_head(h[:, -n_text:]).float()
    return F.cross_entropy(logits.flatten(0, 1), torch.zeros(B * n_text, dtype=torch.long), reduction='sum')


def plan(config):
    """The plan of a train_vlm.py config (its keys resolved): a dict of what was counted and the rows of the table."""
    model, spec, quantized, notes = plan_model(config)
    dtype = config['dtype'] if config['dtype'] in ('float32', 'float16') else 'bfloat16'  # 'auto': bf16 on A100/H100
    compute = getattr(torch, dtype)
    T, B = config['max_seq_len'], config['batch_size']
    if not model.bridge and model.num_image_tokens >= T:
        raise GlimpseError(f'plan error: {model.num_image_tokens} image tokens leave no room in max_seq_len={T}')
    with torch.device('meta'):
        one, two = (saved_for_backward(model, b, T, compute, quantized) for b in (1, 2))
    per_sample = {k: two[k] - one[k] for k in ('vision', 'rest')}
    per_sample['llm_blocks'] = sum(two['llm_blocks']) - sum(one['llm_blocks'])
    block_weights = sum(one['block_weights'])
    if spec.grad_checkpointing:  # each block keeps its input; one block's activations (and weights) rebuilt at a time
        per_sample['llm_blocks'] = len(one['llm_blocks']) * T * model.llm.cfg.n_embd * compute.itemsize + \
            max(b2 - b1 for b1, b2 in zip(one['llm_blocks'], two['llm_blocks']))
        block_weights = max(one['block_weights'])
    activations = sum(per_sample.values())  # per row of the batch
    # under autocast, the bf16 copies of fp32 weights that the backward needs (DDP; FSDP gathers bf16 weights)
    autocast_copies = one['weights'] + block_weights if dtype != 'float32' else 0

    params = dict(model.named_parameters())
    n_all = sum(p.numel() for p in params.values())
    n_trained = sum(p.numel() for p in params.values() if p.requires_grad)
    n_4bit = sum(params[n].numel() for n in quantized)
    # bitsandbytes NF4/FP4: 4 bits a weight + a scale per 64 (8-bit with double quantisation, else fp32)
    stored = (n_all - n_4bit) * 4 + n_4bit * (0.5 + (1 + 4 / 256 if spec.qlora_double_quant else 4) / 64)
    from sharding import decoder_blocks
    block_params = [sum(p.numel() for p in b.parameters()) for b in [*model.vision_tower.blocks,
                                                                       *decoder_blocks(model.llm)]]
    root_params = n_all - sum(block_params)  # FSDP's root unit: gathered for the whole step
    optimizer = config.get('optimizer', 'adamw')
    matrices = sum(p.numel() for n, p in params.items() if p.requires_grad and is_hidden_matrix(n, p))
    optim_bytes = {'adamw': 8 * n_trained, 'paged_adamw': 8 * n_trained, 'adamw8bit': 2 * n_trained,
                   'muon': 4 * matrices + 8 * (n_trained - matrices)}[optimizer]
    fsdp_refused = next((why for bad, why in ((n_4bit, 'QLoRA'), (dtype == 'float16', 'fp16'),
                                              (optimizer != 'adamw', optimizer)) if bad), None)
    rows = []
    for strategy in ('DDP', 'FSDP'):
        for n in GPUS:
            if strategy == 'DDP':
                weights = stored + autocast_copies
                grads = 4 * n_trained * (2 if n > 1 else 1)  # n > 1: DDP's reducer buckets hold a second copy
                optim = optim_bytes
            else:
                # shards, plus the units gathered in the compute dtype: the root for the whole step, the block
                # running and the one prefetched
                weights = stored / n + compute.itemsize * (root_params + 2 * max(block_params, default=0))
                # sharded fp32 gradients; with grad_accum, micro-steps accumulate whole ones (no_sync) too
                grads = 4 * n_trained / n + (4 * n_trained if config['grad_accum'] > 1 else 0)
                optim = optim_bytes / n
            fixed = weights + grads + optim
            budget = [(card - CONTEXT) * GiB / HEADROOM for card in CARDS]
            rows.append(dict(strategy=strategy, gpus=n, weights=weights, grads=grads, optim=optim,
                             activations=activations * B, total=fixed + activations * B,
                             fits=[fixed + activations * B <= b for b in budget],
                             max_batch=[max(0, int((b - fixed) // activations)) for b in budget],
                             refused=fsdp_refused if strategy == 'FSDP' else None))
    return dict(spec=spec, dtype=dtype, params=n_all, trained=n_trained, quantized=n_4bit,
                image_tokens=model.num_image_tokens, per_sample=per_sample, autocast_copies=autocast_copies,
                rows=rows, notes=notes, parts={k: sum(p.numel() for p in getattr(model, k).parameters())
                                               for k in ('vision_tower', 'connector', 'llm')})


def table(name, p, config):
    """The plan as text: a header naming what was planned, and one line per (strategy, GPUs)."""
    s = p['spec']
    parts = ', '.join(f'{k.replace("_tower", "")} {v / 1e6:,.0f}M {m}' for (k, v), m in
                      zip(p['parts'].items(), (s.vision_mode, 'trained', s.llm_mode)))
    images = f'{p["image_tokens"]} image tokens' if p['image_tokens'] else 'images by cross-attention (bridge)'
    lines = [f'{name}: {p["params"] / 1e9:.2f}B parameters ({parts}), {p["trained"] / 1e6:,.1f}M trained; '
             f'{images}, rows of {config["max_seq_len"]} tokens; {p["dtype"]}; per GPU batch {config["batch_size"]} '
             f'x grad_accum {config["grad_accum"]}' + ('; gradient checkpointing' if s.grad_checkpointing else ''),
             f'{"":11}{"weights":>9}{"grads":>8}{"optim":>8}{"activ.":>8}{"total":>8}  '
             f'fits {"/".join(map(str, CARDS))} GB   largest batch {"/".join(map(str, CARDS))} GB']
    g = lambda b: f'{b / GiB:.1f}'
    for r in p['rows']:
        label = f'{r["strategy"]:<4} {r["gpus"]} GPU' + ('s' if r['gpus'] > 1 else ' ')
        if r['refused']:
            lines.append(f'{label:<12}refused: fsdp does not shard {r["refused"]} (ModelSpec.check)')
            continue
        lines.append(f'{label:<12}{g(r["weights"]):>8}{g(r["grads"]):>8}{g(r["optim"]):>8}{g(r["activations"]):>8}'
                     f'{g(r["total"]):>8}  {" ".join("yes" if f else " no" for f in r["fits"]):<14}'
                     f'{"/".join(map(str, r["max_batch"]))}')
    return '\n'.join(lines + [f'  ({n})' for n in p['notes']])
