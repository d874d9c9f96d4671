"""Image splitting (tiling.py) and several images per sample: the tiles, their pixels and their token layout
against transformers' Idefics3 processor; batches whose image token counts vary; an Idefics3 export of a
split-image run whose logits equal glimpse's for a non-square image and for two images in one prompt; and the
refusals."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint import ModelSpec, load_run
from conftest import TINY, run
from data import VLMDataset, collate
from errors import GlimpseError
from model import IGNORE_INDEX
from test_export import IDEFICS3, export, train
from tiling import Tiler
from tokenizer import Tokenizer

SPLIT = ['--image_size=32', '--max_image_size=64', '--image_splitting=True', '--max_seq_len=160']


def processor(image_size, max_image_size):
    from transformers import Idefics3ImageProcessor
    return Idefics3ImageProcessor(do_resize=True, size={'longest_edge': max_image_size}, do_image_splitting=True,
                                  max_image_size={'longest_edge': image_size}, resample=3, do_rescale=False,
                                  do_normalize=False, do_pad=True)


@pytest.mark.parametrize('h,w,tile,longest', [(100, 37, 32, 96), (37, 100, 32, 96), (64, 64, 32, 64),
                                              (50, 50, 64, 192), (300, 200, 64, 200), (20, 90, 16, 40),
                                              (30, 30, 32, 40), (61, 64, 32, 32 * 6)])
def test_tiles_are_the_processors_pixel_for_pixel(h, w, tile, longest):
    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = processor(tile, longest)(images=[[image]], return_tensors='pt', return_row_col_info=True)
    tiles, grid = Tiler(tile, longest)(image)
    assert grid == (out['rows'][0][0], out['cols'][0][0]) == Tiler(tile, longest).grid(h, w)
    assert torch.equal(tiles, out['pixel_values'][0].permute(0, 2, 3, 1).to(torch.uint8))


@pytest.mark.parametrize('kind', ['word', 'byte'])
def test_the_token_layout_of_a_split_image_is_the_processors(kind, tmp_path):
    """glimpse's ids for two images (split 2x3 and 3x3) equal what the exported tokenizer makes of the
    Idefics3 processor's expansion of the same prompt."""
    from transformers import Idefics3Processor
    from export import export_tokenizer
    tok = Tokenizer.build(kind, ['which one is red?'], 'idefics3', tile_markers=True)
    hf_tok = export_tokenizer(tok, '<end_of_utterance>')
    proc = Idefics3Processor(image_processor=processor(32, 96), tokenizer=hf_tok, image_seq_len=3)
    images = [Image.new('RGB', (100, 40)), Image.new('RGB', (20, 20))]
    text = '<image>\n<image>\nwhich one is red?'
    theirs = proc(text=text, images=[images])['input_ids'][0]
    grids = [Tiler(32, 96).grid(im.height, im.width) for im in images]
    assert grids == [(2, 3), (3, 3)]  # a small image is scaled up to the longest edge first
    ours = tok.encode_chat([{'role': 'user', 'content': text}], 3, grids=grids)[0][2:-1]  # <bos><|user|> .. <|end|>
    assert list(theirs) == ours
    assert tok.decode(ours).strip() == 'which one is red?'  # the markers decode to nothing


def test_a_batch_of_split_images_of_different_sizes(shapes_dir, tmp_path):
    """Each sample's image token count follows its images; the tiles stand in the batch in the order their
    placeholders do; packing and isolated turns keep every sample whole."""
    tok = Tokenizer.build('word', [json.loads(l)['turns'][0]['content'] for l in open(f'{shapes_dir}/train.jsonl')],
                          'idefics3', tile_markers=True)
    data = VLMDataset(shapes_dir, 'train')
    data.images = [np.zeros((64, 64, 3), np.uint8), np.zeros((40, 20, 3), np.uint8), np.zeros((30, 30, 3), np.uint8)]
    data.records = [{'id': 'a', 'image': 0, 'turns': [{'role': 'user', 'content': '<image>\nhow many?'},
                                                      {'role': 'assistant', 'content': 'one'}]},
                    {'id': 'b', 'image': [1, 2], 'turns': [{'role': 'user', 'content': '<image>\n<image>\nhow many?'},
                                                           {'role': 'assistant', 'content': 'two'},
                                                           {'role': 'user', 'content': 'how many?'},
                                                           {'role': 'assistant', 'content': 'three'}]}]
    tiler = Tiler(32, 64)
    for pack, isolate in ((False, False), (True, True)):
        batch = collate(data, [0, 1], tok, 4, 200, isolate_turns=isolate, pack=pack, tiler=tiler)
        views = [5, 3, 1]  # 2x2 + global; 1x2 + global; 30x30 -> 64x64 -> 2x2 + global
        views[2] = tiler(data.images[2])[0].shape[0]
        assert batch['images'].shape == (sum(views), 32, 32, 3)
        assert int((batch['input_ids'] == tok.image_token_id).sum()) == 4 * sum(views)
        assert int((batch['targets'] != IGNORE_INDEX).sum()) == 2 + 2 + 2  # every answer and its <|end|>
    data.records[1]['turns'][0]['content'] = '<image>\nhow many?'
    with pytest.raises(GlimpseError, match=r"record 'b' has 2 image\(s\) but 1 '<image>'"):
        collate(data, [1], tok, 4, 200, tiler=tiler)


@pytest.fixture(scope='module')
def split_run(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('split') / 'run'
    return train(shapes_dir, out, *IDEFICS3, *SPLIT)


def test_a_split_image_run_exports_to_idefics3_with_equal_logits(split_run, tmp_path):
    """transformers' AutoProcessor tiles a non-square image 2x1 (plus the global view), and two images in one
    prompt, as glimpse did in training: the same ids, logits within 1e-4, the same greedy tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    assert export(split_run, tmp_path / 'hf') == 'idefics3'
    model, tok = load_run(str(split_run))
    model.eval()
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / 'hf').eval()
    proc = AutoProcessor.from_pretrained(tmp_path / 'hf')
    assert proc.image_processor.do_image_splitting and proc.image_processor.size['longest_edge'] == 64
    rng = np.random.default_rng(0)
    wide, small = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((45, 100, 3), (20, 26, 3)))
    for images in ([wide], [wide, small]):
        content = [{'type': 'image'} for _ in images] + [{'type': 'text', 'text': 'how many objects are there?'}]
        inputs = proc(text=proc.apply_chat_template([{'role': 'user', 'content': content}], add_generation_prompt=True),
                      images=[[Image.fromarray(im) for im in images]], return_tensors='pt')
        pixels, grids = model.image_inputs(images)
        assert grids[0] == (1, 2)
        ids, _ = tok.encode_chat([{'role': 'user', 'content': '<image>\n' * len(images) + 'how many objects are there?'}],
                                 model.num_image_tokens, True, grids=grids)
        assert inputs['input_ids'][0].tolist() == ids
        with torch.no_grad():
            theirs, ours = hf(**inputs).logits[0], model(torch.tensor([ids]), pixels)[0]
        assert theirs.shape == ours.shape and (theirs - ours).abs().max() <= 1e-4
        hf_new = hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None,
                             suppress_tokens=[model.cfg.image_token_id])[0, len(ids):].tolist()
        ours_new = model.generate(torch.tensor([ids]), pixels, torch.ones(1, len(ids), dtype=torch.bool), 8)[0]
        assert hf_new == ours_new.tolist()
    answers = model.chat(tok, [[wide, small]], ['how many objects are there?'])  # what sample.py asks
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_sample_answers_about_several_images(split_run, tmp_path):
    paths = []
    for i, shape in enumerate(((45, 100, 3), (64, 64, 3))):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.fromarray(np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    p = run([sys.executable, 'sample.py', f'--out_dir={split_run}', '--image', paths[0], '--image', paths[1],
             '--prompt=how many objects are there?', '--max_new_tokens=4', '--device=cpu', '--dtype=float32'])
    model, tok = load_run(str(split_run))
    expected = model.eval().chat(tok, [[np.asarray(Image.open(p)) for p in paths]], ['how many objects are there?'],
                                 max_new_tokens=4)
    assert p.stdout.rstrip('\n').split('\n')[-1] == expected[0]


def base_spec(**kw):
    return ModelSpec(**{'image_splitting': True, 'max_image_size': 128, 'image_layout': 'idefics3', **kw})


@pytest.mark.parametrize('kw,message', [
    (dict(connector='bridge'), "image_splitting=True writes each tile's image tokens into the text; connector='bridge'"),
    (dict(image_layout='plain'), "train with image_layout='idefics3', not 'plain'"),
    (dict(max_image_size=64), 'max_image_size=64 must be above the tower'),
    (dict(max_image_size=448), 'at most 6 x 64'),
    (dict(pixel_shuffle_factor=3), 'pixel_shuffle_factor=3 folds 3x3 patches'),
    (dict(hf_vlm='x'), "image_splitting=True is glimpse's own"),
])
def test_bad_splitting_combinations_are_one_line_errors(kw, message):
    with pytest.raises(GlimpseError, match=message.replace('(', r'\(').replace(')', r'\)')) as e:
        base_spec(**kw).check('cpu', {'max_seq_len': 1024})
    assert '\n' not in str(e.value)


def test_a_split_image_that_leaves_no_room_for_text_is_refused_before_training():
    """ModelSpec.check, which train_vlm.py runs before any data or weights load: a 6x6 split of 64px tiles with
    4x4 tokens each fills max_seq_len=256: 37 views of 16 tokens, a marker pair each, a newline a row and one more."""
    with pytest.raises(GlimpseError, match=f'an image split 6x6 takes {(6 * 6 + 1) * (16 + 2) + 6 + 1} tokens') as e:
        base_spec(max_image_size=384).check('cpu', {'max_seq_len': 256})
    assert '\n' not in str(e.value)


def test_a_llava_export_of_a_split_run_is_refused_by_name():
    from export import target_of
    from model import ConnectorConfig, VLMConfig, ViTConfig
    cfg = VLMConfig(vision=ViTConfig(post_norm=False), connector=ConnectorConfig(kind='mlp'), max_image_size=128)
    with pytest.raises(GlimpseError, match="export error: image_splitting: LLaVA's processor shows one view"):
        target_of(cfg, Tokenizer('word', ()))
