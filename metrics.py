"""
Evaluation metrics of a VLM: validation loss, exact-match accuracy of generated answers, and caption metrics
(BLEU-4, CIDEr-D). The training scripts call them at each eval; classify.py reads answers with parse_answer.
"""
import math
import re
from collections import Counter, defaultdict

import numpy as np
import torch

from data import CAPTION_PROMPT, collate, record_images
from model import IGNORE_INDEX


@torch.no_grad()
def val_loss(model, dataset, tokenizer, max_len, batch_size, n_batches, device, amp, isolate_turns=False,
             pad_to_max=False):
    """Mean cross-entropy per supervised token over the first n_batches of the split (batched as collate
    batches them for training: isolate_turns, pad_to_max)."""
    total, count = 0.0, 0
    for b in range(n_batches):
        idx = list(range(b * batch_size, min(len(dataset), (b + 1) * batch_size)))
        if not idx:
            break
        batch = collate(dataset, idx, tokenizer, model.num_image_tokens, max_len, isolate_turns=isolate_turns,
                        pad_to_max=pad_to_max, tiler=getattr(model, 'tiler', None))
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp():
            total += model(**batch).item()
        count += int((batch['targets'] != IGNORE_INDEX).sum())
    return total / max(1, count)


def normalize_answer(s):
    return ' '.join(s.lower().replace('.', ' ').replace('?', ' ').replace(',', ' ').split())


ARTICLES = ('a', 'an', 'the')


def _words(text):
    return re.findall(r'[a-z0-9]+', text.lower())


def parse_answer(text, class_names, aliases=None):
    """The class a generated answer names, or None. Case and punctuation are ignored; names match
    whole words only ('cat' is not in 'category'); the text after the last 'Answer:' is read when
    there is one, and there the first name wins; without one, the answer must name exactly one class.
    An article ('a', 'an', 'the') is a name only when it is the whole answer (multiple choice 'A')."""
    names = {' '.join(_words(c)): c for c in class_names}
    names.update({' '.join(_words(a)): c for a, c in (aliases or {}).items()})
    names.pop('', None)
    marked = [m.end() for m in re.finditer(r'answer\s*:', text, re.IGNORECASE)]
    body = ' '.join(_words(text[marked[-1]:] if marked else text))
    if body not in ARTICLES:
        body = ' '.join(w for w in body.split() if w not in ARTICLES)
    pattern = '|'.join(re.escape(n) for n in sorted(names, key=len, reverse=True))  # longest name first
    found = [names[m.group(1)] for m in re.finditer(rf'(?<![a-z0-9])({pattern})(?![a-z0-9])', body)]
    if not found:
        return None
    if marked or len(set(found)) == 1:
        return found[0]
    return None  # names two classes and says which is the answer nowhere


def answer_is_right(answer, expected, class_names):
    """Exact match (case and punctuation aside); an expected 'Reasoning: ... Answer: <class>' (classify.py
    --mode=convert --reasoning=True) is matched by the class it names, as classify.py's generate mode reads it."""
    if class_names and re.search(r'answer\s*:', expected, re.IGNORECASE):
        want = parse_answer(expected, class_names)
        if want is not None:
            return parse_answer(answer, class_names) == want
    return normalize_answer(answer) == normalize_answer(expected)


@torch.no_grad()
def qa_accuracy(model, dataset, tokenizer, device, amp, max_questions=0, batch_size=128):
    """Accuracy of greedy answers to the split's held-out questions, each asked alone with its image (see
    answer_is_right), given room for the longest expected answer. Returns {type: accuracy, ..., 'all':
    accuracy}, and the number asked."""
    items = [(record_images(r), x) for r in dataset.records for x in r.get('qa', [])]
    if max_questions:
        items = items[:max_questions]
    class_names = dataset.meta.get('class_names') or []
    right, seen = defaultdict(int), defaultdict(int)
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        images = [[dataset.images[j] for j in rows] for rows, _ in chunk]  # each question's images
        if all(len(rows) == 1 for rows, _ in chunk):
            images = np.stack([im for ims in images for im in ims])
        longest = max(len(x['a'].split()) for _, x in chunk)  # words; 8 new tokens cover a one-word answer
        with amp():
            answers = model.chat(tokenizer, images, [x['q'] for _, x in chunk], max_new_tokens=max(8, 2 * longest + 4))
        for (_, x), a in zip(chunk, answers):
            ok = answer_is_right(a, x['a'], class_names)
            for key in (x['type'], 'all'):
                right[key] += ok
                seen[key] += 1
    return {k: right[k] / seen[k] for k in seen}, len(items)


@torch.no_grad()
def caption_scores(model, dataset, tokenizer, device, amp, n_images, batch_size=64, max_new_tokens=48):
    """BLEU-4 and CIDEr-D of greedy captions for the split's first n_images, against their captions."""
    records = [r for r in dataset.records if r.get('captions')][:n_images]
    candidates = []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        images = np.stack([dataset.images[r['image']] for r in chunk])
        with amp():
            candidates += model.chat(tokenizer, images, [CAPTION_PROMPT] * len(chunk), max_new_tokens=max_new_tokens)
    references = [r['captions'] for r in records]
    return {'bleu4': bleu4(candidates, references), 'cider_d': cider_d(candidates, references)}, len(records)


# -----------------------------------------------------------------------------
# caption metrics: BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015), corpus level

def caption_words(s):
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", s.lower())


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(candidates, references):
    """Corpus BLEU-4: clipped n-gram precisions pooled over the corpus, geometric mean, brevity
    penalty against the reference length closest to each candidate. references[i] is a list of strings."""
    match, total, c_len, r_len = [0] * 4, [0] * 4, 0, 0
    for cand, refs in zip(candidates, references):
        c, rs = caption_words(cand), [caption_words(r) for r in refs]
        c_len += len(c)
        r_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            max_ref = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)
            counts = _ngrams(c, n)
            match[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
            total[n - 1] += sum(counts.values())
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if c_len > r_len else math.exp(1 - r_len / max(c_len, 1))
    return bp * math.exp(log_p)


def cider_d(candidates, references, sigma=6.0):
    """Corpus CIDEr-D: per n (1..4) the cosine of TF-IDF n-gram vectors with candidate values clipped
    by the reference's, a Gaussian penalty on the length difference, times 10, averaged over the
    references, the four n and the images. Document frequencies come from the references."""
    refs_w = [[caption_words(r) for r in refs] for refs in references]
    df = Counter()
    for rs in refs_w:
        df.update({g for r in rs for n in range(1, 5) for g in _ngrams(r, n)})
    log_n = math.log(len(references))

    def tfidf(words, n):
        return {g: k * (log_n - math.log(max(1.0, df[g]))) for g, k in _ngrams(words, n).items()}

    scores = []
    for cand, rs in zip(candidates, refs_w):
        c = caption_words(cand)
        score = 0.0
        for n in range(1, 5):
            vc = tfidf(c, n)
            norm_c = math.sqrt(sum(v * v for v in vc.values()))
            for r in rs:
                vr = tfidf(r, n)
                norm_r = math.sqrt(sum(v * v for v in vr.values()))
                if norm_c == 0 or norm_r == 0:
                    continue
                dot = sum(min(vc.get(g, 0.0), v) * v for g, v in vr.items())
                score += math.exp(-(len(c) - len(r)) ** 2 / (2 * sigma ** 2)) * dot / (norm_c * norm_r)
        scores.append(10.0 * score / (4 * len(rs)))
    return sum(scores) / len(scores)
