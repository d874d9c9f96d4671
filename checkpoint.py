"""
A train_vlm.py run: its model built from a config, saved, and loaded back.

    ModelSpec        the keys of train_vlm.py that decide the model (the script builds it once from its globals)
    build_model      what train_vlm.py (and bench.py) trains: the model, its tokenizer, its config, its base
    load_run         a run's model and tokenizer as it was trained, for sample.py, classify.py, llm= and vision=
    save_checkpoint  written to a temporary file, synced and renamed: a crash never leaves a half-written one

A run that does not train every part in full saves only what it trained, plus its base: how to rebuild
the model before training (a seeded init around the pretrained parts, an earlier run's weights, or a
Hugging Face VLM) and a fingerprint of it, which the rebuilt base must match.

    python checkpoint.py merge out/lora out/merged [--dequantize]   # adapters folded into full weights
"""
import itertools
import math
import os
import sys
from dataclasses import dataclass, fields, replace

import torch

from errors import GlimpseError
from lora import DEFAULT_TARGETS, apply_lora, merge_lora
from model import CONNECTORS, VLM, ConnectorConfig, DecoderConfig, ViTConfig, VLMConfig, checkpoint_context
from optim import check_optimizer
from pretrained import (HFCausalLM, HFVLM, blocks_kept, hf_tokenizer_from_files, is_native_llm, load_pretrained_llm,
                        load_pretrained_vision, pretrained_vision_config)
from tokenizer import IMAGE_LAYOUTS, Tokenizer, label_texts
from runtime import seed_everything
from tiling import MAX_GRID, max_grid

MODES = ('frozen', 'full', 'lora', 'qlora')  # what a part does in training: per part, vision_mode and llm_mode


@dataclass
class ModelSpec:
    """train_vlm.py's keys that decide its model, with the script's defaults (tests/test_checkpoint.py holds
    the two together); each means what the comment beside it in train_vlm.py says."""
    # the parts: a whole Hugging Face VLM, or glimpse's VLM from a vision tower, a connector and an LLM
    hf_vlm: str = ''
    vision: str = 'scratch'
    vision_layer: int = -1
    vision_cls: bool = False
    image_size: int = 64
    patch_size: int = 8
    patch_overlap: int = 0
    vit_layers: int = 4
    vit_width: int = 128
    vit_heads: int = 4
    vit_act: str = 'gelu'
    image_resample: str = 'bicubic'
    connector: str = 'pixel_shuffle'
    pixel_shuffle_factor: int = 2
    bridge_heads: int = 8
    connector_norm: bool = False
    llm: str = 'scratch'
    llm_layers: int = 4
    llm_width: int = 256
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_mlp_width: int = 688
    tie_embeddings: bool = True
    tokenizer: str = 'word'
    image_layout: str = 'plain'
    system_prompt: str = None  # a pretrained LLM's chat: the system turn of every conversation (tokenizer.HFTokenizer)
    image_token_labels: tuple = ()  # words written before each image token (tokenizer.label_ids)
    image_splitting: bool = False  # tiles of image_size plus a global view (tiling.py)
    max_image_size: int = 0  # with image_splitting: every image's longest edge is resized to this first
    # what trains
    vision_mode: str = 'full'
    llm_mode: str = 'full'
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple = DEFAULT_TARGETS
    rslora: bool = False
    qlora_quant_type: str = 'nf4'
    qlora_double_quant: bool = True
    grad_checkpointing: bool = False
    attention: str = 'sdpa'  # masked attention in the native decoder: 'sdpa' or 'flex' (model.Decoder.attention)
    dtype: str = 'auto'  # the run's resolved autocast dtype: QLoRA's compute dtype
    # where the weights before training come from
    init_from: str = 'scratch'
    seed: int = 1337

    @classmethod
    def from_config(cls, c):
        """From a script's config dict (or a checkpoint's saved one); a key it lacks keeps the default."""
        return cls(**{f.name: c[f.name] for f in fields(cls) if f.name in c})

    def trains_everything(self):
        return self.vision_mode == self.llm_mode == 'full'

    def check(self, device_type='cpu', config=None):
        """Refuse a bad choice or combination with one line naming the key and what to use instead, before any
        weights load. train_vlm.py calls it once at start-up; config: the script's other keys (learning rates,
        word alignment, batching) whose combinations with the model are refused here too."""
        c = config or {}
        for part, mode in (('vision', self.vision_mode), ('llm', self.llm_mode)):
            if mode not in MODES:
                _refuse(f"--{part}_mode={mode!r}: use one of {', '.join(MODES)}")
        if 'qlora' in (self.vision_mode, self.llm_mode) and self.qlora_quant_type not in ('nf4', 'fp4'):
            _refuse(f"--qlora_quant_type={self.qlora_quant_type!r}: use 'nf4' or 'fp4'")
        if self.attention not in ('sdpa', 'flex'):
            _refuse(f"attention={self.attention!r}: use 'sdpa' or 'flex'")
        if self.attention == 'flex' and device_type != 'cuda':
            _refuse(f"attention='flex' trains on CUDA only (FlexAttention has no backward on {device_type} in "
                    f"torch {torch.__version__}); use attention='sdpa'")
        check_optimizer(c.get('optimizer', 'adamw'), device_type)
        if c.get('fsdp'):
            self._check_fsdp(c)
        if self.image_splitting and self.hf_vlm:
            _refuse(f"image_splitting=True is glimpse's own (tiling.py); {self.hf_vlm}'s processor splits images as "
                    f"its config says: leave image_splitting=False")
        if self.hf_vlm:
            return self._check_hf_vlm(c)
        if self.connector not in CONNECTORS:
            _refuse(f"--connector={self.connector!r}: use one of {', '.join(CONNECTORS)}")
        if self.tokenizer not in ('word', 'byte'):
            _refuse(f"--tokenizer={self.tokenizer!r}: use 'word' or 'byte'")
        if self.image_layout not in IMAGE_LAYOUTS:
            _refuse(f"--image_layout={self.image_layout!r}: use one of {', '.join(IMAGE_LAYOUTS)}")
        if self.vit_act not in ('gelu', 'gelu_tanh') or self.image_resample not in ('bicubic', 'bilinear', 'lanczos'):
            _refuse(f"vit_act={self.vit_act!r}, image_resample={self.image_resample!r}: use 'gelu' or 'gelu_tanh', and "
                    f"'bicubic', 'bilinear' or 'lanczos'")
        if self.image_resample == 'lanczos' and not self.image_splitting:
            _refuse("image_resample='lanczos' resizes split images' tiles (torchvision, on the CPU); the tower resizes "
                    "a whole image bicubic or bilinear: use one of those, or image_splitting=True")
        if self.connector_norm and self.connector not in ('mlp', 'pixel_shuffle'):
            _refuse(f"connector_norm=True ends the MLP projector; with connector={self.connector!r} leave it False")
        if self.vision == 'scratch' and (self.vision_layer != -1 or self.vision_cls):
            _refuse("vision_layer and vision_cls choose features of a pretrained tower; with vision='scratch' "
                    "leave them at -1 and False (the vit_* keys shape the ViT)")
        if self.vision_cls and self.connector.startswith('pixel_shuffle'):
            _refuse("vision_cls=True adds a token to the patch grid, which pixel_shuffle cannot fold; use "
                    "connector='mlp'")
        kind, factor = self.connector, self.pixel_shuffle_factor
        if self.init_from in ('scratch', 'resume'):
            tower = self.tower_config()
            if kind.startswith('pixel_shuffle'):
                self._check_pixel_shuffle(tower.image_size // tower.patch_size, tower)
        else:  # the model is the earlier run's, checked when that run started
            earlier = run_checkpoint(self.init_from)
            if earlier is None:
                _refuse(f'--init_from={self.init_from}: no ckpt.pt there; give the out_dir of a train_vlm.py run, '
                        f"'scratch' or 'resume'")
            made = earlier['model_config']
            kind, factor, tower = made['connector']['kind'], made['connector']['scale_factor'], ViTConfig(**made['vision'])
            split = self.max_image_size if self.image_splitting else 0
            if made.get('max_image_size', 0) != split:
                _refuse(f"--init_from={self.init_from} was trained with max_image_size={made.get('max_image_size', 0)} "
                        f"(0: no image splitting), its vocabulary and token layout with it; give "
                        f"image_splitting={bool(made.get('max_image_size'))} and that max_image_size")
        grid = tower.image_size // tower.patch_size
        if self.image_splitting:
            self._check_splitting(kind, factor, tower, grid, c)
        if self.image_token_labels and kind != 'bridge':
            n = grid * grid // factor ** 2 if kind.startswith('pixel_shuffle') else \
                grid * grid + int(tower.cls_token and tower.keep_cls)
            if len(self.image_token_labels) != n:
                _refuse(f'image_token_labels names {len(self.image_token_labels)} image tokens but the model makes '
                        f'{n}; give one label per image token, or none')
        if self.system_prompt is not None and not self.pretrained_tokenizer():
            _refuse("system_prompt is for a pretrained LLM's chat template (llm=...); glimpse's own tokenizer "
                    "writes no system turn")
        if self.attention == 'flex' and self.llm != 'scratch':
            run = run_checkpoint(self.llm)
            if not (run['model_config'].get('hf_llm') is None if run else is_native_llm(self.llm)):
                _refuse(f"attention='flex' is the native decoder's; {self.llm} runs as a Hugging Face model, which "
                        f"picks its own: use attention='sdpa'")
        if c.get('pack_samples') and self.connector == 'bridge':
            _refuse("pack_samples=True needs image tokens in the sequence, which connector='bridge' has not; leave "
                    "pack_samples=False")

    def _check_splitting(self, kind, factor, tower, grid, c):
        """image_splitting=True: tiles of the tower's image_size plus a global view, in Idefics3's token layout."""
        if kind == 'bridge':
            _refuse("image_splitting=True writes each tile's image tokens into the text; connector='bridge' has "
                    "none (its text attends to one image): use connector='pixel_shuffle' or 'mlp', or no splitting")
        if self.image_layout != 'idefics3':
            _refuse(f"image_splitting=True writes SmolVLM's tile markers (<row_1_col_1>...) and image markers; "
                    f"train with image_layout='idefics3', not {self.image_layout!r}")
        if self.image_token_labels:
            _refuse('image_splitting=True marks tiles with <row_i_col_j>, not words; leave image_token_labels=()')
        if not tower.image_size < self.max_image_size <= MAX_GRID * tower.image_size:
            _refuse(f'image_splitting=True: max_image_size={self.max_image_size} must be above the tower\'s '
                    f'image_size={tower.image_size} (else no image splits) and at most {MAX_GRID} x {tower.image_size}'
                    f' (Idefics3\'s tile markers stop at <row_{MAX_GRID}_col_{MAX_GRID}>)')
        n = grid * grid // factor ** 2 if kind.startswith('pixel_shuffle') else grid * grid + int(tower.cls_token and tower.keep_cls)
        g = max_grid(tower.image_size, self.max_image_size)
        longest = (g * g + 1) * (n + 2) + g + 1  # tiles, the global view, their markers and newlines
        if longest >= c.get('max_seq_len', float('inf')):
            _refuse(f"image_splitting=True: an image split {g}x{g} takes {longest} tokens ({g * g + 1} views of {n} "
                    f"image tokens and their markers), max_seq_len={c['max_seq_len']} none for text; raise "
                    f"max_seq_len or lower max_image_size")

    def _check_fsdp(self, c):
        """fsdp=True (sharding.py): FSDP2 over torchrun's processes, on glimpse's own VLM."""
        if 'WORLD_SIZE' not in os.environ:
            _refuse("fsdp=True shards over torchrun's processes: torchrun --standalone --nproc_per_node=N "
                    "train_vlm.py ... (N=1 on one GPU), or leave fsdp=False")
        if self.hf_vlm:
            _refuse("fsdp=True shards glimpse's own VLM (its vision and decoder blocks); train a whole hf_vlm with "
                    "fsdp=False")
        if 'qlora' in (self.vision_mode, self.llm_mode):
            _refuse("fsdp=True cannot shard QLoRA's 4-bit base: fully_shard splits bitsandbytes' packed Params4bit "
                    "bytes from their quantisation state; use --llm_mode=lora with fsdp, or qlora with fsdp=False "
                    "(a 4-bit base is small: python bench.py CONFIG --plan)")
        if self.dtype == 'float16':
            _refuse("fsdp=True trains in bfloat16 or float32: fp16's loss scaler finds inf gradients per shard, "
                    "so ranks could disagree on skipping a step; use --dtype=bfloat16")
        if c.get('optimizer', 'adamw') != 'adamw':
            _refuse(f"fsdp=True trains with --optimizer=adamw: Muon orthogonalises whole matrices, not shards, and "
                    f"bitsandbytes' optimizers take no sharded parameters; not --optimizer={c['optimizer']}")
        run = run_checkpoint(c.get('out_dir', '')) if self.init_from == 'resume' else None
        if run is not None and 'optimizer' in run:
            _refuse(f"init_from='resume' with fsdp=True: {c['out_dir']}/ckpt.pt was written without fsdp (a whole "
                    f"optimizer state, not shards); resume it with fsdp=False")

    def _check_pixel_shuffle(self, grid, tower):
        """pixel_shuffle folds s x s patches into one token: the side of the patch grid must be a multiple of s."""
        s = self.pixel_shuffle_factor
        if s >= 1 and grid % s == 0:
            return
        fits = [f for f in range(1, grid + 1) if grid % f == 0]
        sizes = ', '.join(str(tower.patch_size * s * k) for k in range(1, 4))
        _refuse(f"pixel_shuffle_factor={s} folds {s}x{s} patches into a token, but image_size={tower.image_size} with "
                f"patch_size={tower.patch_size} makes a {grid}x{grid} grid: use pixel_shuffle_factor="
                f"{' or '.join(map(str, fits))}, " + (f"an image_size of {sizes}, ..., " if self.vision == 'scratch'
                                                       else '') + "or connector='mlp'")

    def tower_config(self):
        """The vision tower's ViTConfig from config files alone, no weights: the vit_* keys, a pretrained tower's
        config.json and preprocessor_config.json, or an earlier run's checkpoint (its config, memory-mapped)."""
        if self.vision == 'scratch':
            return ViTConfig(image_size=self.image_size, patch_size=self.patch_size)
        run = run_checkpoint(self.vision)
        if run is None:
            return pretrained_vision_config(self.vision, self.vision_layer, self.vision_cls)[0]
        if self.vision_cls:
            _refuse(f'vision_cls=True but {self.vision} holds a glimpse ViT, which has no class token')
        cfg = run.get('model_config', {})
        if 'vision' not in cfg:
            raise GlimpseError(f'vision error: {self.vision}/ckpt.pt was not written by train_siglip.py or '
                               f'train_vlm.py (its model_config has neither image_tower nor vision)')
        return ViTConfig(**cfg['vision'])

    def pretrained_tokenizer(self):
        """Whether the run's tokenizer is a pretrained LLM's (an earlier run's, for init_from, or llm's)."""
        source = self.init_from if self.init_from not in ('scratch', 'resume') else self.llm
        if source == 'scratch':
            return False
        run = run_checkpoint(source)
        return run is None or run['tokenizer']['kind'] == 'hf'

    def _check_hf_vlm(self, c):
        for key in ('vision_lr', 'connector_lr', 'llm_lr'):
            if c.get(key):
                _refuse("vision_lr, connector_lr and llm_lr name glimpse's own parts; with hf_vlm leave them at 0 "
                        "(learning_rate applies to everything that trains)")
        if c.get('word_align_iters'):
            _refuse("word_align_iters trains glimpse's own connector; with hf_vlm leave it at 0")
        if c.get('isolate_turns'):
            _refuse("isolate_turns=True needs glimpse's own VLM; hf_vlm runs train whole conversations")
        if c.get('pack_samples'):
            _refuse("pack_samples=True needs image tokens in glimpse's own VLM, not an hf_vlm's; leave "
                    "pack_samples=False")
        if self.image_token_labels:
            _refuse("image_token_labels writes words between glimpse's own image tokens; an hf_vlm's processor "
                    "lays out its images itself: leave image_token_labels empty")
        if self.attention == 'flex':
            _refuse("attention='flex' is the native decoder's; a Hugging Face model picks its own")
        if self.init_from not in ('scratch', 'resume'):
            _refuse(f"--init_from={self.init_from!r}: a hf_vlm run starts from its Hugging Face model ('scratch') "
                    f"or resumes ('resume')")


def _refuse(message):
    raise GlimpseError('config error: ' + message)


def run_checkpoint(out_dir):
    """out_dir/ckpt.pt of an earlier run, memory-mapped (its tensors are read only if used), or None when out_dir
    holds no run: ModelSpec.check reads configs from it before any weights load."""
    path = os.path.join(out_dir, 'ckpt.pt')
    return torch.load(path, map_location='cpu', weights_only=True, mmap=True) if os.path.isfile(path) else None


# -----------------------------------------------------------------------------
# files

def save_checkpoint(obj, path):
    """Written to a temporary file, synced to disk and renamed: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, device='cpu'):
    if not os.path.exists(path):
        raise GlimpseError(f'checkpoint error: {path} not found; train one with: python train_vlm.py config/shapes.py')
    return torch.load(path, map_location=device, weights_only=True)


def raw_state_dict(model):
    """The weights without the '_orig_mod.' (torch.compile) or 'module.' (DDP) prefixes."""
    model = getattr(model, 'module', model)
    model = getattr(model, '_orig_mod', model)
    return model.state_dict()


def tokenizer_from_state(s):
    """A tokenizer from the state() a checkpoint stored: glimpse's word or byte tokenizer, or a pretrained LLM's
    own (its files). A whole Hugging Face VLM's processor comes back with its model (load_run)."""
    if s['kind'] == 'hf':
        tok = hf_tokenizer_from_files(s['files'], s.get('image_layout', 'plain'), s.get('tile_markers', False))
        tok.system_prompt = s.get('system_prompt')
        tok.image_token_labels = tuple(s.get('image_token_labels', ()))
        return tok
    if s['kind'] == 'hf_processor':
        raise GlimpseError(f"checkpoint error: this run fine-tuned {s['source']}, whose processor comes with the "
                           f"model: load the run with checkpoint.load_run")
    tok = Tokenizer(s['kind'], s['words'], s.get('image_layout', 'plain'), s.get('tile_markers', False))
    tok.image_token_labels = tuple(s.get('image_token_labels', ()))
    return tok


# -----------------------------------------------------------------------------
# partial checkpoints: what trained, and a fingerprint of the base it trained on

def trained_state_dict(model):
    """Only what trains: adapters and any parameter still requiring grad (connector, 'full' parts)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: v for n, v in model.state_dict().items() if n in names}


def load_trained_state_dict(model, sd, source='checkpoint'):
    """Copy a trained_state_dict into a rebuilt model; every key must be used and every trainable
    parameter must be given."""
    params = dict(model.named_parameters())
    unknown = [k for k in sd if k not in params]
    missing = [n for n, p in params.items() if p.requires_grad and n not in sd]
    if unknown or missing:
        raise GlimpseError(f'checkpoint error: {source} does not fit this model (unknown keys {unknown[:3]}, '
                           f'missing trainable {missing[:3]}); use the same llm_mode/vision_mode and lora_* settings')
    with torch.no_grad():
        for k, v in sd.items():
            if params[k].shape != v.shape:
                raise GlimpseError(f'checkpoint error: {source} key {k} has shape {tuple(v.shape)}, '
                                   f'model has {tuple(params[k].shape)}; use the same lora_r and model settings')
            params[k].copy_(v)


@torch.no_grad()
def base_fingerprint(model):
    """What a partial checkpoint needs to find again: every tensor's name and shape, and a float64
    checksum of the values (different weights of the same shapes give a different checksum)."""
    shapes = {n: list(v.shape) for n, v in model.state_dict().items()}
    checksum = sum(float(v.double().abs().sum()) for v in model.state_dict().values() if v.is_floating_point())
    return {'shapes': shapes, 'checksum': checksum}


def check_fingerprint(expected, got, source):
    """expected, got: base_fingerprint()s of the base a checkpoint was trained on and of the rebuilt one."""
    if got['shapes'] != expected['shapes']:
        diff = sorted(k for k in set(got['shapes']) | set(expected['shapes'])
                      if got['shapes'].get(k) != expected['shapes'].get(k))
        raise GlimpseError(f'checkpoint error: the base model rebuilt for {source} differs from the one it was trained '
                           f'on ({len(diff)} tensors differ, e.g. {diff[:3]}); give the same base weights and model keys')
    if not math.isclose(got['checksum'], expected['checksum'], rel_tol=1e-6):
        raise GlimpseError(f'checkpoint error: the base weights rebuilt for {source} have the right shapes but other '
                           f'values (checksum {got["checksum"]:.6g} != {expected["checksum"]:.6g}); '
                           'point llm/vision/seed at the base the adapters were trained on')


# -----------------------------------------------------------------------------
# the parts: an LLM and a vision tower, pretrained or from an earlier run

def load_llm(source, image_layout='plain', tile_markers=False):
    """(tokenizer, LLM module) of train_vlm.py's llm= other than 'scratch': the out_dir of a train_vlm.py run
    (its language model as trained, adapters merged, and its tokenizer), or a pretrained LLM (a Hugging
    Face directory or cache id, or a .gguf file: pretrained.load_pretrained_llm), its tokenizer writing
    images in image_layout."""
    if not os.path.isfile(os.path.join(source, 'ckpt.pt')):
        return load_pretrained_llm(source, image_layout, tile_markers)
    model, tok = load_run(source)
    if isinstance(model, HFVLM):
        raise GlimpseError(f'llm error: {source} fine-tuned a whole Hugging Face VLM; llm= takes a run of glimpse\'s '
                           f'own VLM, a Hugging Face causal LM (directory or cache id) or a .gguf file')
    if tok.image_layout != image_layout:
        raise GlimpseError(f'config error: llm={source} writes images in the {tok.image_layout!r} layout; give '
                           f'--image_layout={tok.image_layout}')
    if tok.tile_markers != tile_markers:
        raise GlimpseError(f'config error: llm={source} was trained with image_splitting={tok.tile_markers}, so its '
                           f'vocabulary {"has" if tok.tile_markers else "lacks"} the tile markers; give '
                           f'--image_splitting={tok.tile_markers}')
    return tok, merge_lora(model, dequantize=True).llm


def load_vision(source, layer=-1, keep_cls=False):
    """(ViTConfig, weights) of train_vlm.py's vision= other than 'scratch': the out_dir of a train_siglip.py run
    (stage 1) or of a train_vlm.py run (its tower as trained, adapters merged; a tower that run kept frozen
    comes from that run's own source), or a SigLIP, CLIP or DINOv2 checkpoint (pretrained.load_pretrained_vision).
    layer: the block whose output is the tower's (-1 the last, with its final LayerNorm; -2 the penultimate's
    raw output, as LLaVA takes CLIP's; 1..L from the first); the blocks after it are dropped."""
    path = os.path.join(source, 'ckpt.pt')
    if not os.path.isfile(path):
        return load_pretrained_vision(source, layer, keep_cls)
    ckpt = load_checkpoint(path)
    cfg = ckpt.get('model_config', {})
    if 'vision' in cfg and 'connector' in cfg:  # a train_vlm.py run
        if ckpt.get('config', {}).get('hf_vlm'):
            raise GlimpseError(f"vision error: {path} fine-tuned {ckpt['config']['hf_vlm']}, whose tower is not a "
                               f"glimpse ViT; vision= takes a glimpse run or a SigLIP, CLIP or DINOv2 checkpoint")
        vlm = merge_lora(from_checkpoint(ckpt, source=path), dequantize=True)
        vit, weights = vlm.cfg.vision, vlm.vision_tower.state_dict()
    elif 'image_tower' in cfg:  # a train_siglip.py run
        if cfg['image_tower'] != 'vit':
            raise GlimpseError(f"vision error: {path} holds a {cfg['image_tower']} image tower; the VLM takes a ViT "
                               f"one (train_siglip.py --image_tower=vit)")
        vit = ViTConfig(**cfg['vision'])
        weights = {k[len('vision_tower.'):]: v for k, v in ckpt['model'].items() if k.startswith('vision_tower.')}
    else:
        raise GlimpseError(f'vision error: {path} was not written by train_siglip.py or train_vlm.py '
                           f'(its model_config has neither image_tower nor vision)')
    n_keep = blocks_kept(layer, vit.n_layer, source)
    if n_keep == vit.n_layer:
        return vit, weights
    keep = lambda k: not k.startswith('ln_post.') and not (k.startswith('blocks.') and int(k.split('.')[1]) >= n_keep)
    return replace(vit, n_layer=n_keep, post_norm=False), {k: v for k, v in weights.items() if keep(k)}


def vlm_config(spec, tok, llm=None, vision=None):
    """The VLMConfig of spec for this tokenizer. llm: a pretrained Decoder or HFCausalLM, whose config replaces
    the llm_* keys; vision: a pretrained tower's ViTConfig, which replaces the vit_* keys (the connector's input
    width follows)."""
    llm_cfg = llm.cfg if llm is not None else DecoderConfig(
        vocab_size=tok.vocab_size, n_layer=spec.llm_layers, n_head=spec.llm_heads, n_kv_head=spec.llm_kv_heads,
        n_embd=spec.llm_width, intermediate_size=spec.llm_mlp_width, tie_embeddings=spec.tie_embeddings)
    vision = vision or ViTConfig(image_size=spec.image_size, patch_size=spec.patch_size,
                                 patch_overlap=spec.patch_overlap, n_layer=spec.vit_layers, n_head=spec.vit_heads,
                                 n_embd=spec.vit_width, act=spec.vit_act, resample=spec.image_resample)
    return VLMConfig(
        vision=vision,
        connector=ConnectorConfig(kind=spec.connector, in_dim=vision.n_embd, out_dim=llm_cfg.n_embd,
                                  scale_factor=spec.pixel_shuffle_factor, n_head=spec.bridge_heads,
                                  out_norm=spec.connector_norm),
        llm=llm_cfg, image_token_id=tok.image_token_id, max_image_size=spec.max_image_size if spec.image_splitting else 0,
        hf_llm=llm.model.config.to_dict() if isinstance(llm, HFCausalLM) else None)


def new_vlm(cfg):
    """A VLM of cfg with fresh weights (to load a checkpoint's over): its LLM built from cfg.llm, or from
    cfg.hf_llm for a Hugging Face causal LM."""
    return VLM(cfg, HFCausalLM(cfg.hf_llm) if cfg.hf_llm else None)


# -----------------------------------------------------------------------------
# the model a run trains

def apply_modes(model, spec):
    """Freeze, train, or adapt with LoRA / QLoRA the vision tower and the language model of a VLM or an HFVLM
    (spec.vision_mode, spec.llm_mode). A VLM's connector always trains; an HFVLM's other parts (connector,
    output head) stay frozen, the head trains with a 'full' LLM. Gradient checkpointing of the LLM's blocks
    follows spec.grad_checkpointing."""
    hf_vlm = isinstance(model, HFVLM)
    if hf_vlm:
        model.requires_grad_(False)
    for part, module, mode in (('vision', model.vision_tower, spec.vision_mode), ('llm', model.llm, spec.llm_mode)):
        if mode in ('frozen', 'full'):
            module.requires_grad_(mode == 'full')
            continue
        if mode == 'qlora' and spec.dtype == 'auto':
            raise ValueError("ModelSpec.dtype is QLoRA's compute dtype: resolve 'auto' first (runtime.pick_dtype)")
        try:
            apply_lora(module, spec.lora_targets, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.rslora,
                       quantize=spec.qlora_quant_type if mode == 'qlora' else None,
                       double_quant=spec.qlora_double_quant, compute_dtype=getattr(torch, spec.dtype, torch.float32))
        except ValueError as e:  # no layer matches lora_targets
            raise GlimpseError(f'config error: --{part}_mode={mode}: {e}')
    if hf_vlm and spec.llm_mode == 'full':  # the output head sits outside the language model in these models
        model.model.get_output_embeddings().requires_grad_(True)
    hf_model = model.model if hf_vlm else model.llm.model if isinstance(model.llm, HFCausalLM) else None
    if hf_model is None:
        model.llm.grad_checkpointing = spec.grad_checkpointing
        model.llm.attention = spec.attention
    elif spec.grad_checkpointing:  # the Hugging Face model's own block checkpointing
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={'use_reentrant': False, 'context_fn': checkpoint_context})


def base_model(model_cfg, spec, init_from, seed, pretrained=None):
    """The model before any training of a run, on the CPU: seeded initial weights around the pretrained LLM and
    vision tower that spec names, or the weights of the earlier run in the directory init_from (its adapters
    merged). pretrained: (LLM module, vision weights), either None, when the caller has loaded them already."""
    if init_from not in ('scratch', 'resume'):
        return merge_lora(load_run(init_from)[0], dequantize=True)
    if pretrained is None:
        pretrained = (load_llm(spec.llm, spec.image_layout, spec.image_splitting)[1] if spec.llm != 'scratch' else None,
                      load_vision(spec.vision, spec.vision_layer, spec.vision_cls)[1] if spec.vision != 'scratch' else None)
    llm, vision = pretrained
    seed_everything(seed)  # after loading, which may draw random numbers: the same init on every rebuild
    model = VLM(model_cfg, llm=llm)
    if vision is not None:
        model.vision_tower.load_state_dict(vision)
    return model


def build_vlm(model_cfg, spec, device, ckpt=None, source='checkpoint', pretrained=None):
    """glimpse's VLM of model_cfg on device, set up per spec's modes, with ckpt's weights if given. A run that
    does not train everything saves only what it trained plus ckpt['base']: how to rebuild its base (seeded
    init or an earlier run) and a fingerprint to check it against. Returns (model, base). The model is built
    and set up on the CPU and moved to device last: QLoRA quantises there, one layer at a time, so the device
    never holds the full-precision weights."""
    if ckpt and 'base' not in ckpt:  # full weights
        if not spec.trains_everything():
            raise GlimpseError(f'checkpoint error: {source} trained every part in full; resume it with '
                               f'--vision_mode=full --llm_mode=full, or adapt it in a new run with '
                               f'--init_from=<its out_dir>')
        model = new_vlm(model_cfg)
        model.load_state_dict(ckpt['model'])
        apply_modes(model, spec)
        return model.to(device), None
    init_from = ckpt['base']['init_from'] if ckpt else spec.init_from
    seed = ckpt['base']['seed'] if ckpt else spec.seed
    model = base_model(model_cfg, spec, 'scratch' if init_from == 'resume' else init_from, seed, pretrained)
    base = None if spec.trains_everything() else dict(base_fingerprint(model), init_from=init_from, seed=seed)
    if ckpt:
        check_fingerprint(ckpt['base'], base or base_fingerprint(model), source)
    apply_modes(model, spec)
    model.to(device)
    if ckpt:
        load_trained_state_dict(model, ckpt['model'], source)
    return model, base


def build_hf_vlm(spec, device, ckpt=None, source='checkpoint', trust_remote_code=False):
    """The Hugging Face VLM spec.hf_vlm on device, set up per spec's modes (apply_modes), with ckpt's trained
    tensors if given. Its checkpoints hold only what trained, and base: the model's name and fingerprint,
    which a rebuilt base must match. trust_remote_code comes from the person running the command, never from
    a checkpoint. Returns (model, base)."""
    name = spec.hf_vlm  # a moved model directory can be given anew: the fingerprint checks it
    model = HFVLM(name, trust_remote_code)  # on the CPU, set up there, then moved (as build_vlm)
    base = dict(base_fingerprint(model), hf_vlm=name)
    if ckpt:
        check_fingerprint(ckpt['base'], base, source)
    apply_modes(model, spec)
    model.to(device)
    if ckpt:
        load_trained_state_dict(model, ckpt['model'], source)
    return model, base


def build_model(spec, device, texts=(), ckpt=None, source='checkpoint', trust_remote_code=False):
    """What train_vlm.py trains, on device and set up per spec's modes: (model, tokenizer, model_cfg, base).
    With ckpt (a run being resumed), its weights; with spec.init_from the out_dir of an earlier run, that run's
    model and tokenizer; else new, around the pretrained parts spec names, the tokenizer (spec.tokenizer)
    built from texts when the LLM starts from scratch. model_cfg: the VLMConfig (an HFVLM's only summarises
    its sizes, for MFU); base: what a partial checkpoint needs to rebuild its base (None if all trains)."""
    if spec.hf_vlm:
        model, base = build_hf_vlm(spec, device, ckpt, source, trust_remote_code)
        return model, model.processor, model.cfg, base
    pretrained = None
    if ckpt or spec.init_from not in ('scratch', 'resume'):
        made = ckpt or load_checkpoint(os.path.join(spec.init_from, 'ckpt.pt'))
        tok, model_cfg = tokenizer_from_state(made['tokenizer']), VLMConfig.from_dict(made['model_config'])
    elif spec.init_from == 'resume':
        raise GlimpseError('config error: init_from=resume needs the checkpoint of the run to resume')
    else:
        texts = itertools.chain(texts, label_texts(spec.image_token_labels))  # a word vocabulary holds the labels
        tok, llm = (Tokenizer.build(spec.tokenizer, texts, spec.image_layout, spec.image_splitting), None) \
            if spec.llm == 'scratch' else load_llm(spec.llm, spec.image_layout, spec.image_splitting)
        vision = load_vision(spec.vision, spec.vision_layer, spec.vision_cls) if spec.vision != 'scratch' else None
        model_cfg = vlm_config(spec, tok, llm, vision[0] if vision else None)
        pretrained = (llm, vision[1] if vision else None)
    if spec.system_prompt is not None:  # a pretrained LLM's tokenizer (ModelSpec.check)
        tok.system_prompt = spec.system_prompt
    if spec.image_token_labels:  # else an earlier run's own (its tokenizer state), if any
        tok.image_token_labels = tuple(spec.image_token_labels)
    model, base = build_vlm(model_cfg, spec, device, ckpt, source, pretrained)
    return model, tok, model_cfg, base


# -----------------------------------------------------------------------------
# a finished run, for inference

def from_checkpoint(ckpt, device='cpu', trust_remote_code=False, source='checkpoint'):
    """The model of a loaded checkpoint, as it was trained: full weights, or its base rebuilt with what it
    trained (adapters). trust_remote_code: the caller's, for a Hugging Face VLM that needs its own code."""
    spec = ModelSpec.from_config(ckpt['config'])
    if spec.hf_vlm:
        return build_hf_vlm(spec, device, ckpt, source, trust_remote_code)[0]
    return build_vlm(VLMConfig.from_dict(ckpt['model_config']), spec, device, ckpt, source)[0]


def load_run(out_dir, device='cpu', checkpoint='ckpt.pt', trust_remote_code=False):
    """(model, tokenizer) of a train_vlm.py run: out_dir/checkpoint (ckpt.pt, best.pt or weights.pt) on device.
    The tokenizer of a whole Hugging Face VLM's run is its processor (tokenizer.HFProcessor)."""
    path = os.path.join(out_dir, checkpoint)
    ckpt = load_checkpoint(path, device)
    if 'connector' not in ckpt.get('model_config', {}):
        raise GlimpseError(f'checkpoint error: {path} was not written by train_vlm.py (its model_config has no '
                           f'connector); give the out_dir of a train_vlm.py run')
    model = from_checkpoint(ckpt, device, trust_remote_code, path)
    return model, model.processor if isinstance(model, HFVLM) else tokenizer_from_state(ckpt['tokenizer'])


def merge_run(src, dst, dequantize=False):
    """A run that saved adapters -> a run of full weights in dst/ckpt.pt (QLoRA bases dequantised when asked)."""
    ckpt = load_checkpoint(os.path.join(src, 'ckpt.pt'))
    if 'base' not in ckpt:
        raise GlimpseError(f'merge error: {src}/ckpt.pt holds full weights already; nothing to merge')
    if ckpt['config'].get('hf_vlm'):
        raise GlimpseError(f"merge error: {src} fine-tuned {ckpt['config']['hf_vlm']}; its adapters load with "
                           f"its base (classify.py --out_dir, sample.py --out_dir), merged they have no glimpse form")
    model = merge_lora(from_checkpoint(ckpt, source=f'{src}/ckpt.pt'), dequantize=dequantize)
    config = dict(ckpt['config'], vision_mode='full', llm_mode='full', merged_from=src)
    save_checkpoint({'model': model.state_dict(), 'model_config': ckpt['model_config'],
                     'tokenizer': ckpt['tokenizer'], 'config': config}, os.path.join(dst, 'ckpt.pt'))
    print(f'merged {src}/ckpt.pt into full weights: {dst}/ckpt.pt')


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    if len(args) != 3 or args[0] != 'merge' or set(sys.argv[1:]) - set(args) - {'--dequantize'}:
        raise SystemExit('usage: python checkpoint.py merge <out_dir> <new_out_dir> [--dequantize]')
    merge_run(args[1], args[2], '--dequantize' in sys.argv)
