"""
Ask a trained VLM about images.

    python sample.py --image x.png --prompt "what color is the circle?"
    python sample.py --image some/folder --prompt "describe the image."   # one line per image
    python sample.py --image x.png --chat                                  # ask, read, ask again
    python sample.py --prompt "What is the capital of France?"             # no image: the LLM alone
    python sample.py --out_dir=out/shapes --temperature=0.8 --top_k=5 --num_samples=3 --image x.png

Defaults below; --key=value overrides them (see configurator.py).
"""
import functools
import os
import sys

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from configurator import apply_config
from model import Tokenizer, cut_at
from training import autocast_context, load_checkpoint, load_vlm, pick_device, pick_dtype

out_dir = 'out/shapes'  # where train_vlm.py wrote its checkpoints
checkpoint = 'ckpt.pt'  # in out_dir: ckpt.pt (latest), best.pt (lowest val loss) or weights.pt (weights only)
image = ''  # an image file, or a folder of them; none: a text-only question
prompt = 'describe the image.'
chat = False  # interactive: keep asking questions about the same image
max_new_tokens = 64
temperature = 0.0  # 0 = greedy
top_k = 0  # 0 = off
top_p = 1.0  # 1.0 = off
num_samples = 1
seed = 1337
device = 'auto'
dtype = 'auto'
config = apply_config(sys.argv[1:], globals())
# -----------------------------------------------------------------------------

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def load_image(path, size):
    """Any image file -> (size, size, 3) uint8 RGB, center-cropped to a square; size None: as it is."""
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            if size is None:
                return np.asarray(im, dtype=np.uint8)
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            return np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise SystemExit(f'image error: cannot read {path} ({e.__class__.__name__}: {e}); give a PNG or JPEG file')


if image and not os.path.exists(image):
    raise SystemExit(f'image error: {image} not found')
device = pick_device(device)
amp = functools.partial(autocast_context, device.split(':')[0], pick_dtype(dtype, device.split(':')[0]))
ckpt = load_checkpoint(os.path.join(out_dir, checkpoint), device)
hf = bool(ckpt['config'].get('hf_vlm'))  # a fine-tuned Hugging Face VLM: its processor is the tokenizer
if hf and (chat or not image):
    raise SystemExit(f'sample error: {out_dir} fine-tuned a Hugging Face VLM; ask it about images with --image '
                     f'(no --chat, no text-only questions)')
model = load_vlm(ckpt, device).eval()  # full weights, or base + adapters (LoRA runs)
tok = model.processor if hf else Tokenizer.from_state(ckpt['tokenizer'])
size = None if model.cfg.vision.source else model.cfg.vision.image_size  # a pretrained tower resizes as its processor
sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p)
gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None

if not image:  # text only: shows what the language model still knows after training
    ids = torch.tensor([tok.encode_chat([{'role': 'user', 'content': prompt}], 0, add_generation_prompt=True)[0]],
                       device=device)
    for _ in range(num_samples):
        with amp():
            new = model.generate(ids, None, torch.ones_like(ids, dtype=torch.bool), max_new_tokens, tok.eot_id,
                                 generator=gen, **sampling)[0].tolist()
        print(tok.decode(cut_at(new, tok.eot_id)))
    sys.exit()
if os.path.isdir(image):
    paths = sorted(os.path.join(image, f) for f in os.listdir(image) if f.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise SystemExit(f'image error: no image files ({", ".join(IMAGE_EXTS)}) in {image}')
else:
    paths = [image]

if chat:
    pixels = load_image(paths[0], size)[None]
    turns = []
    print(f'chatting about {paths[0]}; an empty line ends')
    while True:
        try:
            q = input('you: ').strip()
        except EOFError:
            break
        if not q:
            break
        turns.append({'role': 'user', 'content': ('<image>\n' if not turns else '') + q})
        ids, _ = tok.encode_chat(turns, model.num_image_tokens, add_generation_prompt=True)
        ids = torch.tensor([ids], device=device)
        with amp():
            new = model.generate(ids, torch.as_tensor(pixels, device=device), torch.ones_like(ids, dtype=torch.bool),
                                 max_new_tokens, tok.eot_id, generator=gen, **sampling)[0].tolist()
        answer = tok.decode(new[:new.index(tok.eot_id)] if tok.eot_id in new else new)
        turns.append({'role': 'assistant', 'content': answer})
        print(f'glimpse: {answer}')
else:
    for path in paths:
        pixels = np.stack([load_image(path, size)] * num_samples)
        with amp():
            answers = model.chat(tok, pixels, [prompt] * num_samples, max_new_tokens, generator=gen, **sampling)
        for a in answers:
            print(f'{path}: {a}' if len(paths) > 1 else a)
