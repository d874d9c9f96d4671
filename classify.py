"""
A VLM as an image classifier, and as a dataset labeller.

    python classify.py --out_dir=out/shapes --data_dir=data/shapes --split=test            # score mode
    python classify.py --mode=generate --reasoning=True                                     # parse what it writes
    python classify.py --hf_model=path/to/SmolVLM --image_folder=pets/ --classes="cat,dog"  # a local HF VLM
    python classify.py --mode=label --num_descriptions=5 --temperature=0.8                  # Dataset_Index,A1..A5 CSV
    python classify.py --mode=convert --convert_dir=data/shapes_cls                         # labels -> conversations

Modes:
    score     the length-normalised log-likelihood of each class name as the assistant's answer, under
              the model's own chat template, all classes in one batched pass that shares the image and
              the prompt; argmax is the prediction, a softmax over the classes its confidence.
    generate  the model writes an answer (greedy unless --temperature) and parse_answer() reads the class
              from it; an answer naming no class (or two, without "Answer:") counts as unparseable.
    label     describe every image num_descriptions times with sampling on and write label_csv, one
              row per image, flushed as it goes; run again after an interruption and it continues.
    convert   a labelled dataset -> a glimpse dataset of classification conversations (answer-only, or
              "Reasoning: <caption> Answer: <class>" with --reasoning=True) that train_vlm.py trains on.

Writes results.json, predictions.csv and confusion.txt (confusion.png when matplotlib is installed)
to results_dir. From a notebook:

    import classify
    model = classify.load_model(out_dir='out/shapes')
    label, confidence, text = classify.predict(model, 'x.png', ['circle', 'square'])
"""
import csv
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from PIL import Image

from checkpoint import load_run
from configurator import apply_config
from data import IMAGE_EXTS, VLMDataset, image_pixels, open_image
from model import cut_at, left_pad
from tokenizer import HFProcessor
from metrics import parse_answer
from runtime import autocast_context, pick_device, pick_dtype

# what to classify
out_dir = 'out/shapes'  # a glimpse run: out_dir/ckpt.pt
hf_model = ''  # or a local Hugging Face image-text-to-text model dir (SmolVLM, Idefics3, Qwen2-VL); overrides out_dir
trust_remote_code = False  # only for HF models whose code lives in their repository
data_dir = 'data/shapes'
split = 'test'
image_folder = ''  # instead of data_dir: a folder of class subfolders, or of loose (unlabelled) images
max_images = 0  # 0 = all
classes = ''  # comma-separated class names; '' = meta.json's class_names (or the subfolder names)
aliases = ''  # other names an answer may use, 'alias=class,...' e.g. 'sq=square,plus=cross'
# prompt: both a string or '@path/to/file'; {classes} becomes "circle, square, ..."
system = ''  # system instruction ('' = none)
template = 'what shape is the large object?'
reasoning = False  # ask for "Reasoning: ... Answer: <class>" (generate mode; convert mode writes that format)
# mode
mode = 'score'  # 'score', 'generate', 'label' or 'convert' (see above)
batch_size = 32
max_new_tokens = 16
temperature = 0.0  # 0 = greedy; the reported generate-mode numbers use greedy
top_k = 0  # 0 = off
top_p = 1.0  # 1.0 = off
seed = 1337
results_dir = 'out/classify'  # results.json, predictions.csv, confusion.txt
# label mode
label_csv = ''  # '' = results_dir/labels.csv
num_descriptions = 5
label_prompt = 'describe the image.'
label_max_new_tokens = 48
# convert mode
convert_dir = ''  # the new dataset dir (images.npy is linked, not copied)
# system
device = 'auto'
dtype = 'auto'
if __name__ == '__main__':
    config = apply_config(sys.argv[1:], globals())
# -----------------------------------------------------------------------------

REASONING_SUFFIX = ' answer in the form "Reasoning: <why> Answer: <class>".'


def read_text(s):
    """A prompt given as a string, or '@path' to read it from a file."""
    if s.startswith('@'):
        try:
            with open(s[1:]) as f:
                return f.read().strip()
        except OSError as e:
            raise SystemExit(f'prompt error: cannot read {s[1:]} ({e.strerror}); give a string or @path to a text file')
    return s


def parse_aliases(s, class_names):
    """'sq=square,plus=cross' -> {'sq': 'square', ...}, each target checked against the classes."""
    out = {}
    for item in filter(None, (x.strip() for x in s.split(','))):
        alias, eq, target = item.partition('=')
        if not eq or target.strip() not in class_names:
            raise SystemExit(f"aliases error: '{item}' should be alias=class with class one of {', '.join(class_names)}")
        out[alias.strip()] = target.strip()
    return out


def build_prompt(class_names, template, reasoning=False):
    text = template.replace('{classes}', ', '.join(class_names))
    return text + (REASONING_SUFFIX if reasoning else '')




# -----------------------------------------------------------------------------
# models: a glimpse checkpoint or a Hugging Face VLM behind the same three methods

def to_pil(image):
    """A path, a PIL image or an (H, W, 3) uint8 array -> an RGB PIL image, as it is."""
    return Image.fromarray(image_pixels(image))


class GlimpseModel:
    """A glimpse VLM and its tokenizer; only the tokenizer interface is used (encode_chat, decode,
    eot_id, image_token_id, pad_id), so any tokenizer behind it works."""

    def __init__(self, model, tok, device, dtype='auto'):
        self.model, self.tok, self.device = model.eval(), tok, device
        self.dtype = pick_dtype(dtype, self.device.split(':')[0])
        # the square each image is fitted to: the tower's, or a model that splits images the longest edge it
        # resizes to, so every image splits into the same tiles and one prompt fits them all
        self.size = self.model.cfg.max_image_size or self.model.cfg.vision.image_size

    def amp(self):
        return autocast_context(self.device.split(':')[0], self.dtype)

    def pixels(self, images):
        """-> (the tower's input on the device, the grids of one image): each image fitted to the square
        (data.image_pixels), then as the model takes it (model.VLM.image_inputs: tiles when it splits)."""
        x, grids = self.model.image_inputs([image_pixels(im, self.size) for im in images])
        return x.to(self.device), grids and grids[:1]

    def turns(self, prompt, system=''):
        return ([{'role': 'system', 'content': system}] if system else []) + \
               [{'role': 'user', 'content': '<image>\n' + prompt}]

    @torch.no_grad()
    def generate(self, images, prompt, system='', max_new_tokens=16, generator=None, **sampling):
        pixels, grids = self.pixels(images)
        ids, _ = self.tok.encode_chat(self.turns(prompt, system), self.model.num_image_tokens, add_generation_prompt=True,
                                      grids=grids)
        input_ids, mask = left_pad([ids] * len(images), self.tok.pad_id)
        with self.amp():
            new = self.model.generate(input_ids.to(self.device), pixels, mask.to(self.device),
                                      max_new_tokens, self.tok.eot_id, generator=generator, **sampling)
        return [self.tok.decode(cut_at(row.tolist(), self.tok.eot_id)) for row in new.cpu()]

    @torch.no_grad()
    def score(self, images, prompt, answers, system=''):
        """Mean log-probability of each answer's text tokens after the prompt: (B, K). The end-of-turn
        token that follows in training is left out: it scores whether the answer *stops* there, and a
        model that would go on ("triangle and square") then ranks classes by how final they sound, not
        by which is right (on the shapes test split: 47% with it, 59% without). The image and prompt run
        once per image, the answers together (model.VLM.score)."""
        n_img, turns = self.model.num_image_tokens, self.turns(prompt, system)
        pixels, grids = self.pixels(images)
        prompt_ids, _ = self.tok.encode_chat(turns, n_img, add_generation_prompt=True, grids=grids)
        conts = []
        for a in answers:
            ids, sup = self.tok.encode_chat(turns + [{'role': 'assistant', 'content': a}], n_img, grids=grids)
            if ids[:len(prompt_ids)] != prompt_ids:
                raise ValueError('the chat template does not extend the generation prompt with the answer; '
                                 'score mode needs it to')
            conts.append([t for t, s in zip(ids[len(prompt_ids):], sup[len(prompt_ids):]) if s][:-1])  # not <|end|>
        with self.amp():
            return self.model.score(prompt_ids, pixels, conts, self.tok.pad_id).cpu()


class HFModel:
    """A local Hugging Face image-text-to-text model and its processor (chat template included); or, with run,
    a train_vlm.py hf_vlm run's checkpoint: its base model with the adapters it trained (kept in float32)."""

    def __init__(self, path, device='auto', dtype='auto', trust_remote_code=False, run=None):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        self.device = pick_device(device)
        if run is not None:  # a pretrained.HFVLM, as checkpoint.load_run rebuilt it
            self.model, self.processor = run.model, run.processor.processor
        else:
            if not os.path.isdir(path):
                raise SystemExit(f'model error: {path} is not a local model directory (config.json, weights, processor)')
            torch_dtype = 'auto' if dtype == 'auto' else getattr(torch, dtype)
            self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype,
                                                                     trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.tokenizer = self.processor.tokenizer

    def chat_text(self, prompt, system='', answer=None):
        messages = ([{'role': 'system', 'content': [{'type': 'text', 'text': system}]}] if system else []) + \
                   [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': prompt}]}]
        if answer is not None:
            messages.append({'role': 'assistant', 'content': [{'type': 'text', 'text': answer}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)

    def inputs(self, texts, images, padding_side='left'):
        self.tokenizer.padding_side = padding_side
        batch = self.processor(text=texts, images=[[to_pil(im)] for im in images], return_tensors='pt', padding=True)
        return batch.to(self.device)

    @torch.no_grad()
    def generate(self, images, prompt, system='', max_new_tokens=16, generator=None, temperature=0.0, top_k=None,
                 top_p=1.0):
        batch = self.inputs([self.chat_text(prompt, system)] * len(images), images)
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p) \
            if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, **sampling)
        return [t.strip() for t in self.processor.batch_decode(out[:, batch['input_ids'].shape[1]:],
                                                               skip_special_tokens=True)]

    @torch.no_grad()
    def score(self, images, prompt, answers, system=''):
        """As GlimpseModel.score: (B, K) mean log-probability of each answer's tokens (the template's
        text after the generation prompt, up to the answer's end). Rows are image-major: (b, k) -> b*K + k.
        Each row is the full sequence; the images are processed K times (simple, not the fastest)."""
        head = self.chat_text(prompt, system)
        tails = []
        for a in answers:
            full = self.chat_text(prompt, system, a)
            if not full.startswith(head):
                raise ValueError('the chat template does not extend the generation prompt with the answer; '
                                 'score mode needs it to')
            tail = full[len(head):]
            tails.append(tail[:tail.index(a) + len(a)] if a in tail else tail)  # the end-of-turn markers cut
        B, K = len(images), len(answers)
        # the prompt's length can depend on the image (Qwen2-VL: image tokens by image size)
        n_head = torch.tensor([self.inputs([head], [im])['input_ids'].shape[1] for im in images for _ in answers])
        # right-padded, so every row has the positions it would have alone
        batch = self.inputs([head + t for _ in images for t in tails], [im for im in images for _ in answers], 'right')
        ids, mask = batch['input_ids'], batch['attention_mask'].bool()  # (B*K, S)
        logp = self.model(**batch).logits[:, :-1].float().log_softmax(-1)
        tok_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B*K, S-1): log p of token t+1
        pos = torch.arange(1, ids.shape[1], device=ids.device)[None]
        in_answer = (pos >= n_head.to(ids.device)[:, None]) & mask[:, 1:]
        score = (tok_logp * in_answer).sum(1) / in_answer.sum(1)
        return score.view(B, K).cpu()


def load_model(out_dir='', hf_model='', device='auto', dtype='auto', trust_remote_code=False):
    """A glimpse run's out_dir or a local Hugging Face VLM dir, ready for predict(). trust_remote_code: yours,
    for a model whose code ships with it; a run's checkpoint never turns it on."""
    if hf_model:
        return HFModel(hf_model, device, dtype, trust_remote_code)
    device = pick_device(device)
    model, tok = load_run(out_dir, device, trust_remote_code=trust_remote_code)  # base + adapters for LoRA runs
    if isinstance(tok, HFProcessor):
        return HFModel('', device, dtype, run=model)  # a fine-tuned Hugging Face VLM: its base + what trained
    return GlimpseModel(model, tok, device, dtype)


def predict_batch(model, images, class_names, mode='score', aliases=None, system='', template='{classes}?',
                  reasoning=False, max_new_tokens=16, generator=None, **sampling):
    """images (paths, PIL images or uint8 arrays) -> [(label, confidence, text)]. Score mode: the class
    with the highest score, its softmax probability over the classes, and the class name. Generate
    mode: the parsed class (None if unparseable), confidence None, and the text the model wrote."""
    prompt = build_prompt(class_names, template, reasoning)
    if mode == 'score':
        probs = model.score(images, prompt, list(class_names), system).softmax(-1)  # (B, K)
        best = probs.argmax(-1).tolist()
        return [(class_names[k], float(probs[i, k]), class_names[k]) for i, k in enumerate(best)]
    if mode == 'generate':
        texts = model.generate(images, prompt, system, max_new_tokens, generator, **sampling)
        return [(parse_answer(t, class_names, aliases), None, t) for t in texts]
    raise ValueError(f"unknown mode '{mode}': use 'score' or 'generate'")


def predict(model, image, class_names, **kwargs):
    """One image -> (label, confidence, text); keyword arguments as predict_batch."""
    return predict_batch(model, [image], class_names, **kwargs)[0]


# -----------------------------------------------------------------------------
# data: a glimpse dataset split or an image folder -> (images, labels or None, class names, ids)

class ImageSource:
    def __init__(self, data_dir, split, image_folder, class_names, max_images=0):
        self.records = None
        if image_folder:
            if not os.path.isdir(image_folder):
                raise SystemExit(f'data error: {image_folder} is not a folder')
            subdirs = sorted(d for d in os.listdir(image_folder) if os.path.isdir(os.path.join(image_folder, d)))
            found = []
            for label, d in enumerate(subdirs or ['']):
                folder = os.path.join(image_folder, d)
                found += [(os.path.join(folder, f), label if subdirs else None)
                          for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_EXTS)]
            if not found:
                raise SystemExit(f'data error: no image files ({", ".join(IMAGE_EXTS)}) in {image_folder}')
            self.class_names = class_names or subdirs
            if subdirs and class_names and len(class_names) != len(subdirs):
                raise SystemExit(f'data error: {len(subdirs)} class subfolders in {image_folder} but '
                                 f'{len(class_names)} --classes; give one name per subfolder, in sorted order')
            self.items, self.labels = [p for p, _ in found], [l for _, l in found]
            self.ids = [os.path.relpath(p, image_folder) for p in self.items]
        else:
            ds = VLMDataset(data_dir, split)
            self.class_names = class_names or ds.meta.get('class_names') or []
            self.records, self.images = ds.records, ds.images
            self.items = [r['image'] for r in ds.records]
            self.labels = [r.get('label') for r in ds.records]
            self.ids = [r.get('id', str(i)) for i, r in enumerate(ds.records)]
        if max_images:
            self.items, self.labels, self.ids = self.items[:max_images], self.labels[:max_images], self.ids[:max_images]

    def __len__(self):
        return len(self.items)

    def load(self, i):
        item = self.items[i]
        return open_image(item) if isinstance(item, str) else np.array(self.images[item])


def metrics(labels, preds, class_names):
    """Accuracy over every image (unparseable counts as wrong), per-class precision and recall, and
    the confusion matrix: rows the true class, columns the predicted one, the last 'unparseable'."""
    K = len(class_names)
    cm = np.zeros((K, K + 1), dtype=np.int64)
    for y, p in zip(labels, preds):
        cm[y, K if p is None else p] += 1
    n = int(cm.sum())
    per_class = {}
    for k, c in enumerate(class_names):
        predicted, actual = int(cm[:, k].sum()), int(cm[k].sum())
        per_class[c] = {'precision': cm[k, k] / predicted if predicted else 0.0,
                        'recall': cm[k, k] / actual if actual else 0.0, 'support': actual}
    return {'accuracy': float(np.trace(cm[:, :K])) / max(1, n), 'n': n, 'unparseable': int(cm[:, K].sum()),
            'per_class': {c: {k: float(v) if k != 'support' else v for k, v in d.items()}
                          for c, d in per_class.items()},
            'confusion': cm.tolist()}


def confusion_table(cm, class_names):
    cols = list(class_names) + ['unparseable']
    w = max(8, max(map(len, cols)) + 1)
    lines = ['true \\ predicted'.ljust(w) + ''.join(c.rjust(w) for c in cols)]
    for name, row in zip(class_names, cm):
        lines.append(name.ljust(w) + ''.join(str(v).rjust(w) for v in row))
    return '\n'.join(lines) + '\n'


def confusion_png(cm, class_names, path):
    """Only when matplotlib is installed; it is not a dependency."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * cm.shape[1], 1 + 0.6 * cm.shape[0]))
    ax.imshow(cm, cmap='Blues')
    ax.set_xticks(range(cm.shape[1]), list(class_names) + ['unparseable'], rotation=45, ha='right')
    ax.set_yticks(range(cm.shape[0]), class_names)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha='center', va='center')
    ax.set_xlabel('predicted')
    ax.set_ylabel('true')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def classify(model, source, class_names, aliases, mode, system, template, reasoning, batch_size, results_dir,
             max_new_tokens=16, generator=None, **sampling):
    """Every image of the source -> predictions.csv, results.json, confusion.txt in results_dir."""
    from tqdm import tqdm
    os.makedirs(results_dir, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for s in tqdm(range(0, len(source), batch_size), desc=f'{mode}', unit='batch'):
        idx = range(s, min(len(source), s + batch_size))
        out = predict_batch(model, [source.load(i) for i in idx], class_names, mode, aliases, system, template,
                            reasoning, max_new_tokens, generator, **sampling)
        rows += [(i, *o) for i, o in zip(idx, out)]
    seconds = time.perf_counter() - t0
    with open(os.path.join(results_dir, 'predictions.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['id', 'label', 'prediction', 'confidence', 'text'])
        for i, pred, conf, text in rows:
            y = source.labels[i]
            w.writerow([source.ids[i], '' if y is None else class_names[y], '' if pred is None else pred,
                        '' if conf is None else f'{conf:.4f}', text])
    result = {'mode': mode, 'images': len(rows), 'seconds': seconds, 'images_per_s': len(rows) / seconds,
              'prompt': build_prompt(class_names, template, reasoning), 'system': system, 'classes': list(class_names)}
    if all(y is not None for y in source.labels):
        result.update(metrics(source.labels, [None if p is None else class_names.index(p) for _, p, _, _ in rows],
                              class_names))
        table = confusion_table(result['confusion'], class_names)
        with open(os.path.join(results_dir, 'confusion.txt'), 'w') as f:
            f.write(table)
        confusion_png(result['confusion'], class_names, os.path.join(results_dir, 'confusion.png'))
        print(table + f"accuracy {result['accuracy']:.1%} on {result['n']} images, "
                      f"{result['unparseable']} unparseable; " +
              ', '.join(f"{c} P {d['precision']:.0%} R {d['recall']:.0%}" for c, d in result['per_class'].items()))
    else:
        result['unparseable'] = sum(p is None for _, p, _, _ in rows)
    print(f"{result['images_per_s']:.1f} images/s; wrote {results_dir}/results.json and predictions.csv")
    with open(os.path.join(results_dir, 'results.json'), 'w') as f:
        json.dump(result, f, indent=2)
    return result


# -----------------------------------------------------------------------------
# labelling: N sampled descriptions per image -> Dataset_Index,A1..AN

def read_done_rows(path, n):
    """Indices already in a labels CSV. A trailing line without its newline is a row cut off by a
    crash: it is removed from the file, and that image is described again."""
    if not os.path.exists(path):
        return set()
    with open(path, 'rb') as f:
        data = f.read()
    if data and not data.endswith(b'\n'):
        data = data[:data.rfind(b'\n') + 1]
        with open(path, 'r+b') as f:
            f.truncate(len(data))
    rows = list(csv.reader(data.decode().splitlines()))
    if not rows:
        return set()
    expected = ['Dataset_Index'] + [f'A{k + 1}' for k in range(n)]
    if rows[0] != expected:
        raise SystemExit(f'label error: {path} starts with {rows[0]} but this job writes {expected}; '
                         f'use another --label_csv or the same --num_descriptions')
    return {int(r[0]) for r in rows[1:]}


def label_dataset(describe, n_images, path, num_descriptions, batch_size):
    """describe(indices) -> one list of num_descriptions texts per index. Rows are written and flushed
    one at a time, so an interrupted job loses at most the batch in flight; run again, it continues."""
    from tqdm import tqdm
    done = read_done_rows(path, num_descriptions)
    todo = [i for i in range(n_images) if i not in done]
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, 'a', newline='') as f:
        w = csv.writer(f)
        if new_file:
            w.writerow(['Dataset_Index'] + [f'A{k + 1}' for k in range(num_descriptions)])
            f.flush()
        for s in tqdm(range(0, len(todo), batch_size), desc='label', unit='batch'):
            idx = todo[s:s + batch_size]
            for i, texts in zip(idx, describe(idx)):
                w.writerow([i] + [t.replace('\n', ' ') for t in texts])
                f.flush()
                os.fsync(f.fileno())
    return len(done), len(todo)


# -----------------------------------------------------------------------------
# classification conversations for train_vlm.py

def classification_turns(prompt, answer):
    return [{'role': 'user', 'content': '<image>\n' + prompt}, {'role': 'assistant', 'content': answer}]


def convert_dataset(data_dir, out, class_names, prompt, reasoning=False):
    """A labelled glimpse dataset -> one in which every sample is the classification question and its
    answer: the class name, or 'Reasoning: <first caption> Answer: <class>'. The held-out 'qa' is the
    same question, so train_vlm.py's evaluation reports classification accuracy. images.npy is linked."""
    os.makedirs(out, exist_ok=True)
    for split in ('train', 'val', 'test'):
        if not os.path.exists(os.path.join(data_dir, f'{split}.jsonl')):
            continue
        ds = VLMDataset(data_dir, split)
        with open(os.path.join(out, f'{split}.jsonl'), 'w') as f:
            for lineno, r in enumerate(ds.records, 1):
                if r.get('label') is None:
                    raise SystemExit(f'data error: {data_dir}/{split}.jsonl line {lineno} has no label')
                name = class_names[r['label']]
                answer = name
                if reasoning:
                    if not r.get('captions'):
                        raise SystemExit(f'data error: {data_dir}/{split}.jsonl line {lineno} has no caption for '
                                         f'the reasoning; use --reasoning=False')
                    answer = f"Reasoning: {r['captions'][0]} Answer: {name}"
                f.write(json.dumps({**r, 'turns': classification_turns(prompt, answer),
                                    'qa': [{'q': prompt, 'a': answer, 'type': 'class'}]}) + '\n')
    dst = os.path.join(out, 'images.npy')
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.symlink(os.path.abspath(os.path.join(data_dir, 'images.npy')), dst)
    except OSError:  # no symlinks on this filesystem
        shutil.copy(os.path.join(data_dir, 'images.npy'), dst)
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    meta.update(source=f"classification conversations of {meta.get('source', data_dir)}", prompt=prompt,
                reasoning=reasoning, class_names=list(class_names))
    with open(os.path.join(out, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=2)


# -----------------------------------------------------------------------------

def main():
    class_names = [c.strip() for c in classes.split(',') if c.strip()]
    if mode not in ('score', 'generate', 'label', 'convert'):
        raise SystemExit(f"config error: --mode={mode!r}; use 'score', 'generate', 'label' or 'convert'")
    sys_text, tmpl = read_text(system), read_text(template)
    if mode == 'convert':
        if not convert_dir:
            raise SystemExit('config error: convert mode writes a new dataset: give --convert_dir=data/<name>')
        names = class_names or VLMDataset(data_dir, 'test', 1).meta.get('class_names')
        convert_dataset(data_dir, convert_dir, names, build_prompt(names, tmpl), reasoning)
        print(f'wrote {convert_dir}: train with python train_vlm.py --data_dir={convert_dir}')
        return
    if mode == 'label' and temperature == 0:
        raise SystemExit('config error: label mode samples several descriptions per image; '
                         'set --temperature (e.g. 0.8), greedy ones would all be the same')
    source = ImageSource(data_dir, split, image_folder, class_names, max_images)
    names = source.class_names
    if mode in ('score', 'generate') and not names:
        raise SystemExit('config error: no class names: give --classes="cat,dog,..." (or a meta.json with class_names)')
    alias_map = parse_aliases(aliases, names)  # a bad alias stops the run before the model loads
    torch.manual_seed(seed)
    model = load_model(out_dir, hf_model, device, dtype, trust_remote_code)
    gen = torch.Generator(device=model.device).manual_seed(seed) if temperature > 0 and not hf_model else None
    sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p)
    if mode == 'label':
        path = label_csv or os.path.join(results_dir, 'labels.csv')
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        prompt = read_text(label_prompt)

        def describe(idx):
            images = [source.load(i) for i in idx for _ in range(num_descriptions)]
            texts = model.generate(images, prompt, sys_text, label_max_new_tokens, gen, **sampling)
            return [texts[j * num_descriptions:(j + 1) * num_descriptions] for j in range(len(idx))]

        before, added = label_dataset(describe, len(source), path, num_descriptions,
                                      max(1, batch_size // num_descriptions))
        print(f'{path}: {before} rows were already there, {added} added')
        return
    print(f"classes: {', '.join(names)}; prompt: {build_prompt(names, tmpl, reasoning)!r}")
    classify(model, source, names, alias_map, mode, sys_text, tmpl, reasoning, batch_size,
             results_dir, max_new_tokens, gen, **sampling)


if __name__ == '__main__':
    main()
