"""
Ask a trained VLM about images.

    python sample.py --image x.png --prompt "what color is the circle?"
    python sample.py --image a.png --image b.png --prompt "which image has more objects?"  # one answer about both
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
image = []  # image files (each --image adds one; the prompt is about all of them), or one folder of them (one
#             answer per image); none: a text-only question
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

for path in image:
    if not os.path.exists(path):
        raise SystemExit(f'image error: {path} not found')
device = pick_device(device)
amp = functools.partial(autocast_context, device.split(':')[0], pick_dtype(dtype, device.split(':')[0]))
if hf_vlm:
    model = HFVLM(hf_vlm, trust_remote_code).to(device)
    tok = model.processor
else:
    model, tok = load_run(out_dir, device, checkpoint, trust_remote_code)  # full weights, or base + adapters
model.eval()
hf = isinstance(tok, HFProcessor)  # a fine-tuned Hugging Face VLM: its processor is the tokenizer
if hf and (chat or len(image) != 1):
    raise SystemExit(f'sample error: {hf_vlm or out_dir} is a Hugging Face VLM; ask it about one image (or folder) '
                     f'with --image (no --chat, no text-only questions)')
# an image is fitted to a square as prepare_data.py fits a dataset's (the tower then resizes it as it was
# trained); a model that splits images (tiling.py) and a Hugging Face VLM's processor take it as it is
size = None if hf or model.tiler is not None else model.cfg.vision.image_size
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
if len(image) == 1 and os.path.isdir(image[0]):  # one question per image
    questions = [[os.path.join(image[0], f)] for f in sorted(os.listdir(image[0])) if f.lower().endswith(IMAGE_EXTS)]
    if not questions:
        raise SystemExit(f'image error: no image files ({", ".join(IMAGE_EXTS)}) in {image[0]}')
elif any(os.path.isdir(path) for path in image):
    raise SystemExit('image error: give one folder (one answer per image) or image files, not both')
else:
    questions = [image]  # one question about all of them

if chat:
    pixels, grids = model.image_inputs([image_pixels(path, size) for path in questions[0]])
    turns = []
    print(f'chatting about {", ".join(questions[0])}; an empty line ends')
    while True:
        try:
            q = input('you: ').strip()
        except EOFError:
            break
        if not q:
            break
        turns.append({'role': 'user', 'content': ('<image>\n' * len(questions[0]) if not turns else '') + q})
        ids, _ = tok.encode_chat(turns, model.num_image_tokens, add_generation_prompt=True, grids=grids)
        ids = torch.tensor([ids], device=device)
        with amp():
            new = model.generate(ids, pixels.to(device), torch.ones_like(ids, dtype=torch.bool),
                                 max_new_tokens, tok.eot_id, generator=gen, **sampling)[0].tolist()
        answer = tok.decode(cut_at(new, tok.eot_id))
        turns.append({'role': 'assistant', 'content': answer})
        print(f'glimpse: {answer}')
else:
    for paths in questions:
        pixels = [image_pixels(path, size) for path in paths]
        pixels = np.stack(pixels * num_samples) if len(paths) == 1 else [pixels] * num_samples  # a list: several
        with amp():
            answers = model.chat(tok, pixels, [prompt] * num_samples, max_new_tokens, generator=gen, **sampling)
        for a in answers:
            print(f'{paths[0]}: {a}' if len(questions) > 1 else a)
