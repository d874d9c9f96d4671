"""export.py: a glimpse run as a transformers Idefics3 (SmolVLM) or LLaVA model, loaded with the Auto classes and
no trust_remote_code; its logits on a processor-built input equal glimpse's, and greedy decoding agrees."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import classify
from checkpoint import load_run
from conftest import TINY, run
from lora import merge_lora
from test_pretrained import save_tiny as save_tiny_llm
from test_vision_backbones import save_tiny as save_tiny_vision

QUESTION = 'how many objects are there?'
IDEFICS3 = ['--connector=pixel_shuffle_linear', '--image_layout=idefics3']
ONE_STEP = ['--max_iters=1', '--eval_interval=1', '--eval_questions=1']


def train(shapes_dir, out, *extra):
    run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={out}', *TINY, '--max_iters=6',
         '--eval_interval=6', '--batch_size=8', '--learning_rate=3e-3', '--warmup_iters=1', '--test_at_end=False',
         '--eval_questions=4', '--isolate_turns=True', '--dtype=float32', *extra])
    return out


def export(run_dir, out):
    p = run([sys.executable, 'export.py', str(run_dir), str(out)])
    return p.stdout.split(' as ')[1].split()[0]


def assert_same_as_glimpse(run_dir, hf_dir, image_size, seed=0):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model, tok = load_run(str(run_dir))
    model = merge_lora(model, dequantize=True).eval()
    hf = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)
    image = np.random.default_rng(seed).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': QUESTION}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       images=[[Image.fromarray(image)]], return_tensors='pt')
    ids, _ = tok.encode_chat([{'role': 'user', 'content': '<image>\n' + QUESTION}], model.num_image_tokens, True)
    assert inputs['input_ids'][0].tolist() == ids  # the processor writes what glimpse trained on
    pixels = torch.from_numpy(image)[None]
    with torch.no_grad():
        theirs, ours = hf(**inputs).logits[0], model(torch.tensor([ids]), pixels)[0]
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() <= 1e-4
    # 8 greedy tokens, past any end of turn, both sides barred from the image token (glimpse never writes one)
    n = 8
    hf_new = hf.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         suppress_tokens=[model.cfg.image_token_id])[0, len(ids):].tolist()
    glimpse_new = model.generate(torch.tensor([ids]), pixels, torch.ones(1, len(ids), dtype=torch.bool), n)[0].tolist()
    assert hf_new == glimpse_new
    return hf, processor


@pytest.mark.parametrize('tokenizer', ['word', 'byte'])
def test_idefics3_export_equals_the_run(shapes_dir, tmp_path, tokenizer):
    out = train(shapes_dir, tmp_path / 'run', *IDEFICS3, f'--tokenizer={tokenizer}')
    assert export(out, tmp_path / 'hf') == 'idefics3'
    hf, processor = assert_same_as_glimpse(out, tmp_path / 'hf', 64)
    assert type(hf).__name__ == 'Idefics3ForConditionalGeneration'
    assert hf.config.text_config.architectures == ['LlamaForCausalLM']  # llama.cpp's converter picks its model by it
    fake, glob, img = processor.tokenizer.convert_tokens_to_ids(['<fake_token_around_image>', '<global-img>', '<image>'])
    ids = processor(text='<image>', images=[[Image.new('RGB', (64, 64))]])['input_ids'][0]
    assert list(ids) == [fake, glob] + [img] * 16 + [fake]  # SmolVLM's layout, 16 image tokens
    assert (tmp_path / 'hf' / 'generation_config.json').exists() and (tmp_path / 'hf' / 'README.md').exists()


def test_a_lora_run_exports_merged_and_classify_scores_the_same(shapes_dir, tmp_path):
    base = train(shapes_dir, tmp_path / 'base', *IDEFICS3)
    out = train(shapes_dir, tmp_path / 'lora', *IDEFICS3, f'--init_from={base}', '--llm_mode=lora', '--lora_r=4')
    export(out, tmp_path / 'hf')
    assert_same_as_glimpse(out, tmp_path / 'hf', 64, seed=1)
    # the round trip through classify.py: the exported directory scores the classes as the run does
    images = [np.random.default_rng(s).integers(0, 256, (64, 64, 3), dtype=np.uint8) for s in (2, 3)]
    classes = ['circle', 'square', 'triangle']
    a = classify.load_model(out_dir=str(out), device='cpu', dtype='float32').score(images, QUESTION, classes)
    b = classify.load_model(hf_model=str(tmp_path / 'hf'), device='cpu', dtype='float32').score(images, QUESTION, classes)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_llava_export_of_a_run_on_a_pretrained_llm_and_siglip(shapes_dir, tmp_path):
    save_tiny_vision('siglip', tmp_path / 'siglip')  # a 32 px tower: the 64 px images are resized by it
    save_tiny_llm('llama', tmp_path / 'llama')
    out = train(shapes_dir, tmp_path / 'run', f'--vision={tmp_path / "siglip"}', '--vision_layer=-2',
                f'--llm={tmp_path / "llama"}', '--connector=mlp')
    assert export(out, tmp_path / 'hf') == 'llava'
    hf, _ = assert_same_as_glimpse(out, tmp_path / 'hf', 32)
    assert type(hf).__name__ == 'LlavaForConditionalGeneration'
    # and glimpse trains the exported model again, as a Hugging Face VLM
    run([sys.executable, 'train_vlm.py', f'--hf_vlm={tmp_path / "hf"}', f'--data_dir={shapes_dir}',
         f'--out_dir={tmp_path / "again"}', '--device=cpu', '--max_iters=2', '--eval_interval=2', '--batch_size=2',
         '--llm_mode=lora', '--vision_mode=frozen', '--test_at_end=False', '--eval_questions=2', '--val_batches=1',
         '--peak_flops=1e12'])


def test_a_run_that_cannot_map_is_a_one_line_error(tiny_run, tmp_path):
    p = run([sys.executable, 'export.py', str(tiny_run), str(tmp_path / 'x')], check=False)
    assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("export error: connector: 'pixel_shuffle' has no Hugging Face counterpart"), p.stderr
    assert not (tmp_path / 'x').exists()  # a refusal writes nothing, not even the directory


def test_what_has_no_counterpart_is_refused_by_name():
    """target_of names the key that has no Hugging Face counterpart: a normed connector (LLaVA's projector has no
    final norm), overlapping patches, Idefics3's projector with glimpse's plain image layout."""
    from errors import GlimpseError
    from export import target_of
    from model import ConnectorConfig, DecoderConfig, ViTConfig, VLMConfig
    from tokenizer import Tokenizer
    tok = Tokenizer.build('word', ['<image>\nwhat color is it?', 'red'])
    cfg = VLMConfig(ViTConfig(image_size=32, patch_size=8, n_layer=1, n_head=2, n_embd=32, post_norm=False),
                    ConnectorConfig(kind='mlp', in_dim=32, out_dim=48, out_norm=True),
                    DecoderConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=4, n_kv_head=2, n_embd=48),
                    image_token_id=tok.image_token_id)
    with pytest.raises(GlimpseError, match='export error: connector_norm: True'):
        target_of(cfg, tok)
    cfg.connector.out_norm = False
    assert target_of(cfg, tok) == 'llava'
    cfg.vision.patch_overlap = 4
    with pytest.raises(GlimpseError, match='export error: patch_overlap: 4'):
        target_of(cfg, tok)
    cfg.vision.patch_overlap, cfg.vision.post_norm, cfg.connector.kind = 0, True, 'pixel_shuffle_linear'
    with pytest.raises(GlimpseError, match="export error: image_layout: 'plain'"):
        target_of(cfg, tok)
