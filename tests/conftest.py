import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a model small enough that a training step takes milliseconds
TINY = ['--vit_layers=1', '--vit_width=32', '--vit_heads=2', '--llm_layers=2', '--llm_width=32',
        '--llm_heads=4', '--llm_kv_heads=2', '--llm_mlp_width=64', '--device=cpu', '--compile=False',
        '--eval_questions=20', '--val_batches=1', '--log_interval=1', '--peak_flops=1e12',
        '--plot_curves=False']


def run(args, env_extra=None, check=True, input=None):
    """Run a glimpse script (or torchrun) from the repository root; returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env_extra or {}))
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                       input=input)
    if check and p.returncode != 0:
        raise AssertionError(f'{" ".join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[:3000]}\n...\n{p.stderr[-3000:]}')
    return p


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory):
    """A small shapes dataset in the real on-disk layout."""
    d = tmp_path_factory.mktemp('data') / 'shapes'
    run([sys.executable, 'prepare_data.py', 'shapes', '--out_dir', str(d), '--n_train', '96', '--n_val', '16',
         '--n_test', '16', '--workers', '1'])
    return str(d)


@pytest.fixture(scope='session')
def tiny_run(shapes_dir, tmp_path_factory):
    """out_dir of a tiny model trained for a few steps on shapes_dir."""
    out = tmp_path_factory.mktemp('out') / 'tiny'
    run([sys.executable, 'train_vlm.py', f'--data_dir={shapes_dir}', f'--out_dir={out}', *TINY,
         '--max_iters=20', '--eval_interval=20', '--batch_size=16', '--learning_rate=3e-3', '--warmup_iters=2',
         '--test_at_end=False'])
    return str(out)


# -----------------------------------------------------------------------------
# a tiny random Idefics3 (SmolVLM's architecture) with a word-level tokenizer, built offline

def make_tiny_idefics3(out, words=()):
    """Saves model and processor to out. Its vocabulary: the shapes class question and names, plus words."""
    import torch
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, PreTrainedTokenizerFast)
    specials = ['<pad>', '<unk>', '<|im_start|>', '<end_of_utterance>', '<image>', '<fake_token_around_image>',
                '<global-img>']
    base = ['user', 'assistant', 'system', ':', 'what', 'shape', 'is', 'the', 'large', 'object', '?', 'a', '.', ',',
            'describe', 'image', 'be', 'brief', 'circle', 'square', 'triangle', 'diamond', 'cross']
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + base + list(words)))}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token='<pad>', unk_token='<unk>', bos_token='<|im_start|>',
                                  eos_token='<end_of_utterance>', additional_special_tokens=specials[4:])
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }} :{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
            "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant :{% endif %}")
    images = Idefics3ImageProcessor(do_image_splitting=False, size={'longest_edge': 32},
                                    max_image_size={'longest_edge': 32})
    processor = Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=chat)
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),  # 16 patches, pixel shuffle 2 -> 4 image tokens
        text_config=dict(model_type='llama', vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
        scale_factor=2, image_token_id=vocab['<image>'], pad_token_id=0)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(cfg)
    with torch.no_grad():  # at the default init (std 0.02) a final RMSNorm caps the logits near +-0.6: no model
        model.lm_head.weight.normal_(0.0, 0.5)  # below could move the loss far; with 0.5 it can learn
    model.save_pretrained(out)
    processor.save_pretrained(out)
