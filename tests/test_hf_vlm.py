"""train_vlm.py hf_vlm=...: a whole Hugging Face VLM (a tiny random Idefics3, SmolVLM's architecture) fine-tuned
with LoRA on glimpse conversations, and the Mars recipe (config/mars.py)."""
import json
import os
import re
import shutil
import sys

import pytest
import torch

import classify
from conftest import make_tiny_idefics3, run
from checkpoint import ModelSpec, build_hf_vlm, load_checkpoint
from data import VLMDataset, collate, conversation
from lora import DEFAULT_TARGETS
from model import IGNORE_INDEX
from pretrained import HFVLM
from optim import make_optimizer

SHAPES = ['circle', 'square', 'triangle', 'diamond', 'cross']
LORA = dict(init_from='scratch', vision_mode='frozen', llm_mode='lora', lora_r=8, lora_alpha=16, lora_dropout=0.0,
            lora_targets=DEFAULT_TARGETS, rslora=False, qlora_quant_type='nf4', qlora_double_quant=True,
            dtype='float32', seed=0)


@pytest.fixture(scope='module')
def tiny(shapes_dir, tmp_path_factory):
    """(model dir, classification dataset dir): a tiny Idefics3 whose vocabulary covers shapes_dir's texts,
    and shapes_dir converted to class questions (classify.py --mode=convert)."""
    d = tmp_path_factory.mktemp('hfvlm')
    words = {w for t in VLMDataset(shapes_dir, 'train').texts() for w in re.findall(r'\w+|[^\w\s]', t)}
    make_tiny_idefics3(d / 'idefics3', sorted(words))
    classify.convert_dataset(shapes_dir, str(d / 'cls'), SHAPES, 'what shape is the large object?')
    return str(d / 'idefics3'), str(d / 'cls')


def runs(mask):
    """Positions of the True entries, grouped into runs of consecutive ones."""
    out = []
    for p in mask.nonzero()[:, 0].tolist():
        if out and out[-1][-1] == p - 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def test_batches_supervise_exactly_the_answers(tiny, shapes_dir):
    model = HFVLM(tiny[0])
    proc, tok = model.processor, model.processor.tokenizer
    ds = VLMDataset(shapes_dir, 'train', 3)  # multi-turn conversations of different lengths
    batch = collate(ds, [0, 1, 2], proc, None, 512)  # the processor's batch, through glimpse's collate
    ids, targets = batch['input_ids'], batch['targets']
    eou = tok.convert_tokens_to_ids('<end_of_utterance>')
    for b in range(3):
        sup = targets[b] != IGNORE_INDEX
        assert torch.equal(ids[b, 1:][sup[:-1]], targets[b][sup])  # target t is token t + 1
        answers = [t['content'] for t in conversation(ds.records[b]) if t['role'] == 'assistant']
        spans = runs(torch.cat([torch.zeros(1, dtype=torch.bool), sup[:-1]]))  # the supervised tokens
        assert [tok.decode(ids[b, s[:-1]]) for s in spans] == answers  # each answer, nothing else ...
        assert all(ids[b, s[-1]] == eou for s in spans)  # ... and the end of its turn
        assert int((ids[b] == proc.image_token_id).sum()) == 4  # the image expanded by the processor
    # the loss is transformers' own (its labels are the unshifted targets), summed
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 1:] = targets[:, :-1]
    inputs = {k: v for k, v in batch.items() if k != 'targets'}
    with torch.no_grad():
        ref = model.model(**inputs, labels=labels).loss * int((targets != IGNORE_INDEX).sum())
        assert torch.allclose(model(**batch), ref, rtol=1e-5)
    # too long: the tail goes (and is counted), the image never
    stats = {'truncated': 0}
    short = collate(ds, [0, 1], proc, None, 24, stats)
    assert short['input_ids'].shape == (2, 24) and stats['truncated'] == 2
    assert torch.equal(short['input_ids'], ids[:2, :24]) and short['targets'][:, -1].eq(IGNORE_INDEX).all()
    with pytest.raises(SystemExit, match='max_seq_len=8 leaves no room after the image tokens'):
        collate(ds, [0], proc, None, 8)


def test_lora_trains_only_adapters_and_the_loss_falls(tiny):
    model, base = build_hf_vlm(ModelSpec(**LORA, hf_vlm=tiny[0]), 'cpu')
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all('lora_' in n and '.text_model.' in n for n in trainable)  # the language model only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = VLMDataset(tiny[1], 'train', 8)
    batch = collate(ds, range(8), model.processor, None, 64)
    n = int((batch['targets'] != IGNORE_INDEX).sum())
    opt = make_optimizer(model, 1e-2, 0.0, (0.9, 0.95), 'cpu')
    losses = []
    for _ in range(12):
        loss = model(**batch) / n
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all('lora_B' in k or 'lora_A' in k for k in changed)  # the base is bit-identical
    # a base with the same shapes but other weights is refused by the fingerprint
    other = os.path.join(os.path.dirname(tiny[0]), 'other')
    shutil.copytree(tiny[0], other)
    hf = HFVLM(other).model
    with torch.no_grad():
        hf.lm_head.weight.add_(0.01)
    hf.save_pretrained(other)
    with pytest.raises(SystemExit, match='have the right shapes but other values'):
        build_hf_vlm(ModelSpec(**LORA, hf_vlm=other), 'cpu', {'base': base, 'model': {}})


def test_mars_recipe_trains_resumes_and_classifies(tiny, tmp_path):
    """config/mars.py as written, with the tiny model and shapes questions standing in for SmolVLM and Mars."""
    model_dir, data = tiny
    out = tmp_path / 'mars'
    args = [sys.executable, 'train_vlm.py', 'config/mars.py', f'--hf_vlm={model_dir}', f'--data_dir={data}',
            f'--out_dir={out}', '--device=cpu', '--compile=False', '--batch_size=2', '--grad_accum=1',
            '--warmup_iters=1', '--eval_interval=2', '--val_batches=1', '--eval_questions=4', '--log_interval=1',
            '--peak_flops=1e12', '--test_at_end=False']
    run(args + ['--max_iters=2'])
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['hf_vlm'] == model_dir and ckpt['base']['hf_vlm'] == model_dir
    assert ckpt['model'] and all('lora_' in k for k in ckpt['model'])  # only what trained
    p = run(args + ['--max_iters=4', '--init_from=resume'])
    evals = [json.loads(l) for l in open(out / 'metrics.jsonl') if 'val_loss' in l]
    assert [e['iter'] for e in evals] == [0, 2, 4] and all(e['val_loss'] == e['val_loss'] for e in evals)
    assert 'accuracy on 4 val questions' in p.stdout and 'iter 3: loss' in p.stdout and 'iter 1: loss' not in p.stdout
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    # classify.py loads the run by its out_dir: the base model with the adapters it trained
    m = classify.load_model(out_dir=str(out), device='cpu')
    params = dict(m.model.named_parameters())
    assert all(torch.equal(params[k.removeprefix('model.')], v) for k, v in ckpt['model'].items())
    assert any(v.abs().sum() > 0 for k, v in ckpt['model'].items() if 'lora_B' in k)  # adapters that do something
    ds = VLMDataset(data, 'test', 2)
    images = [ds.images[r['image']] for r in ds.records]
    tuned = m.score(images, 'what shape is the large object?', SHAPES)
    plain = classify.load_model(hf_model=model_dir, device='cpu', dtype='float32').score(
        images, 'what shape is the large object?', SHAPES)
    assert tuned.shape == (2, 5) and not torch.allclose(tuned, plain)


def test_mars_steps_offline_are_one_line_errors(tiny, tmp_path):
    """The recipe's commands, as its header gives them, without the hub dataset or model."""
    header = [l[1:].strip() for l in open('config/mars.py') if l.startswith('#')]
    prepare = next(l for l in header if l.startswith('python prepare_data.py'))
    assert 'Mirali33/mb-domars16k' in prepare
    offline = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'empty_cache')}
    p = run([sys.executable, 'prepare_data.py', 'hf', '--dataset', 'Mirali33/mb-domars16k', '--out_dir',
             str(tmp_path / 'mars')], offline, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert lines[-1].startswith("data error: cannot load dataset 'Mirali33/mb-domars16k'") and 'save_to_disk' in lines[-1]
    p = run([sys.executable, 'train_vlm.py', 'config/mars.py', f'--data_dir={tiny[1]}', f'--out_dir={tmp_path}/out',
             '--device=cpu'], offline, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and 'Traceback' not in p.stderr
    assert lines[-1].startswith("pretrained error: 'HuggingFaceTB/SmolVLM-256M-Instruct' is not a local directory")
    assert 'hf download HuggingFaceTB/SmolVLM-256M-Instruct' in lines[-1]
