"""word_align.py: the connector's pre-alignment to the LLM's embeddings of each grid cell's words, and
image_token_labels through a whole run (train_vlm.py, its checkpoint, sample.py)."""
import os
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, run
from data import VLMDataset
from model import VLM, ConnectorConfig, DecoderConfig, ViTConfig, VLMConfig
from prepare_data import POSITIONS
from test_sample import reference_answers, save_test_images
from runtime import autocast_context
from tokenizer import Tokenizer
from word_align import cell_words, word_align, word_targets

RECORD = {'id': 'r0', 'image': 0, 'objects': [{'cell': 0, 'color': 'red', 'shape': 'circle', 'size': 'large'},
                                              {'cell': 4, 'color': 'blue', 'shape': 'cross', 'size': 'small'}]}


AMP = lambda: autocast_context('cpu', 'float32')  # what train_vlm.py hands word_align in fp32


class Records:  # what word_targets reads of a dataset
    def __init__(self, records):
        self.records, self.data_dir = records, 'data/x'


def test_cell_words_and_targets_are_the_summed_embeddings_of_each_cells_words():
    assert cell_words(RECORD) == ['red circle'] + ['nothing'] * 3 + ['blue cross'] + ['nothing'] * 4
    tok = Tokenizer.build('word', ['red circle blue cross nothing'])
    E = torch.randn(tok.vocab_size, 8)
    t = word_targets(tok, E, Records([RECORD]), [0])
    word = lambda w: E[tok.stoi[w]]
    assert t.shape == (1, 9, 8)
    torch.testing.assert_close(t[0, 0], word('red') + word('circle'))
    torch.testing.assert_close(t[0, 4], word('blue') + word('cross'))
    torch.testing.assert_close(t[0, 8], word('nothing'))


def test_a_record_without_objects_is_a_one_line_error_naming_it():
    tok = Tokenizer.build('word', ['nothing'])
    with pytest.raises(SystemExit, match=r"record r1 of data/x has no 'objects'.*word_align_iters=0"):
        word_targets(tok, torch.zeros(tok.vocab_size, 4), Records([{'id': 'r1', 'image': 0, 'captions': ['a']}]), [0])


def grid_vlm(tok, connector='mlp', image_size=24):
    torch.manual_seed(0)  # 24 px in patches of 8: a 3x3 grid, one image token per cell (mlp)
    cfg = VLMConfig(ViTConfig(image_size=image_size, patch_size=8, n_layer=1, n_head=2, n_embd=32),
                    ConnectorConfig(kind=connector, in_dim=32, out_dim=48, scale_factor=1),
                    DecoderConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=4, n_kv_head=2, n_embd=48,
                                  intermediate_size=96), image_token_id=tok.image_token_id)
    return VLM(cfg)


def loss_on(model, tok, ds, idx):
    images = torch.from_numpy(np.stack([ds.images[ds.records[i]['image']] for i in idx]))
    target = word_targets(tok, model.llm.embed_tokens.weight.detach(), ds, idx)
    with torch.no_grad():
        return ((model.image_embeddings(images) - target).pow(2).mean() / target.pow(2).mean()).item()


def test_word_align_trains_the_connector_alone_toward_the_words(shapes_dir):
    ds = VLMDataset(shapes_dir, 'train')
    tok = Tokenizer.build('word', list(ds.texts()) + ['nothing'])
    model = grid_vlm(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = list(range(32))
    start = loss_on(model, tok, ds, idx)
    lines = []
    word_align(model, tok, ds, 150, 16, 1e-2, 'cpu', AMP, log=lines.append)
    end = loss_on(model, tok, ds, idx)
    assert end < 0.3 * start, (start, end)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith('connector.') for k in changed)
    assert lines[-1].startswith('word align 150/150: loss')
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(SystemExit, match='one image token per grid cell'):
        word_align(grid_vlm(tok, image_size=32), tok, ds, 1, 4, 1e-2, 'cpu', AMP)


def test_a_run_with_position_labels_and_word_alignment_keeps_them_for_sample_py(shapes_dir, tmp_path):
    out = tmp_path / 'run'
    p = run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={out}', *TINY, '--max_iters=2',
             '--eval_interval=2', '--batch_size=8', '--test_at_end=False', '--image_size=72',
             '--pixel_shuffle_factor=3', f'--image_token_labels={POSITIONS!r}', '--word_align_iters=20',
             '--word_align_batch=8'])
    assert 'word align 20/20: loss' in p.stdout
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert tuple(ckpt['tokenizer']['image_token_labels']) == POSITIONS
    paths, pixels = save_test_images(shapes_dir, tmp_path / 'imgs', 1)
    prompt = 'where is the red circle?'
    p = run([sys.executable, 'sample.py', '--out_dir', str(out), '--image', paths[0], '--prompt', prompt])
    assert reference_answers(str(out), pixels, prompt)[0] in p.stdout
    bad = run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={tmp_path / "bad"}', *TINY,
               '--max_iters=1', "--image_token_labels=('a', 'b')"], check=False)
    assert bad.returncode != 0 and 'image_token_labels names 2 image tokens but the model makes 16' in bad.stderr
