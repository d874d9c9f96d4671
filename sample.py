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

from checkpoint import load_run
from configurator import apply_config
from data import IMAGE_EXTS, image_pixels
from model import cut_at
from pretrained import HFVLM
from tokenizer import HFProcessor
from runtime import autocast_context, pick_device, pick_dtype

out_dir = 'out/shapes'  # where train_vlm.py wrote its checkpoints
hf_vlm = ''  # instead: a Hugging Face image-text-to-text model directory (or cache id), e.g. what export.py wrote
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
trust_remote_code = False  # a Hugging Face VLM run whose model needs its own code: only for one you trust
device = 'auto'
dtype = 'auto'
config = apply_config(sys.argv[1:], globals())
# -----------------------------------------------------------------------------

if image and not os.path.exists(image):
    raise SystemExit(f'image error: {image} not found')
device = pick_device(device)
amp = functools.partial(autocast_context, device.split(':')[0], pick_dtype(dtype, device.split(':')[0]))
if hf_vlm:
    model = HFVLM(hf_vlm, trust_remote_code).to(device)
    tok = model.processor
else:
    model, tok = load_run(out_dir, device, checkpoint, trust_remote_code)  # full weights, or base + adapters
model.eval()
hf = isinstance(tok, HFProcessor)  # a fine-tuned Hugging Face VLM: its processor is the tokenizer
if hf and (chat or not image):
    raise SystemExit(f'sample error: {hf_vlm or out_dir} is a Hugging Face VLM; ask it about images with --image '
                     f'(no --chat, no text-only questions)')
# an image is fitted to a square as prepare_data.py fits a dataset's (the tower then resizes it as it was
# trained); a Hugging Face VLM's processor takes it as it is
size = None if hf else model.cfg.vision.image_size
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
    pixels = image_pixels(paths[0], size)[None]
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
        answer = tok.decode(cut_at(new, tok.eot_id))
        turns.append({'role': 'assistant', 'content': answer})
        print(f'glimpse: {answer}')
else:
    for path in paths:
        pixels = np.stack([image_pixels(path, size)] * num_samples)
        with amp():
            answers = model.chat(tok, pixels, [prompt] * num_samples, max_new_tokens, generator=gen, **sampling)
        for a in answers:
            print(f'{path}: {a}' if len(paths) > 1 else a)
