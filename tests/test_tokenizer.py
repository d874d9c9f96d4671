"""tokenizer.py: glimpse's word and byte tokenizers, a Hugging Face tokenizer behind the same chat interface,
and the tokenizer a checkpoint stores (checkpoint.tokenizer_from_state)."""
import base64

import pytest
import torch

from checkpoint import tokenizer_from_state
from test_model import TEXTS, conversation
from test_pretrained import CONVERSATION, byte_tokenizer
from tokenizer import HFTokenizer, Tokenizer, label_texts


def test_supervised_tokens_are_exactly_the_answers_and_their_end():
    tok = Tokenizer.build('word', TEXTS)
    ids, sup = tok.encode_chat(conversation(), 4)
    assert ids.count(tok.image_token_id) == 4
    sup_ids = [t for t, s in zip(ids, sup) if s]
    expected = tok.encode('red') + [tok.eot_id] + tok.encode(TEXTS[5]) + [tok.eot_id]
    assert sup_ids == expected
    assert tok.decode(tok.encode(TEXTS[5])) == TEXTS[5]


def test_byte_tokenizer_round_trip():
    tok = Tokenizer.build('byte', [])
    s = 'Größe: 3 <image> ok?'
    ids = tok.encode(s)
    assert ids.count(tok.image_token_id) == 1 and tok.decode(ids) == s.replace('<image>', '')


def test_chat_template_and_supervision(tmp_path):
    tok = HFTokenizer(byte_tokenizer())
    ids, sup = tok.encode_chat(CONVERSATION, 3)
    assert ids.count(tok.image_token_id) == 3
    end = tok.tok.convert_tokens_to_ids('<|im_end|>')
    assert tok.eot_id == end
    assert [t for t, s in zip(ids, sup) if s] == tok.encode('red') + [end] + tok.encode('a large blue square.') + [end]
    ids1, _ = tok.encode_chat(CONVERSATION, 1, add_generation_prompt=False)
    assert tok.tok.decode(ids1) == tok.tok.apply_chat_template(CONVERSATION, tokenize=False)
    ids1, _ = tok.encode_chat(CONVERSATION[:3], 1, add_generation_prompt=True)
    assert tok.tok.decode(ids1) == tok.tok.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    # no chat template and no pad token (GPT-2): the plain template, answers end with <eos>, which also pads
    plain = HFTokenizer(byte_tokenizer(None))
    ids, sup = plain.encode_chat(CONVERSATION[:2], 1)
    eos = plain.tok.eos_token_id
    assert plain.eot_id == plain.pad_id == eos
    assert [t for t, s in zip(ids, sup) if s] == plain.encode(' red') + [eos]
    assert plain.tok.decode(ids) == 'User: <image>\nwhat color is the circle?\nAssistant: red<|endoftext|>\n'
    # the checkpoint keeps the tokenizer as plain data: weights_only loading works, and it encodes the same
    torch.save({'tokenizer': tok.state()}, tmp_path / 't.pt')
    back = tokenizer_from_state(torch.load(tmp_path / 't.pt', weights_only=True)['tokenizer'])
    assert back.encode_chat(CONVERSATION, 3) == tok.encode_chat(CONVERSATION, 3)
    assert back.image_token_id == tok.image_token_id and back.eot_id == tok.eot_id


def test_a_checkpoint_tokenizer_cannot_write_outside_its_folder(tmp_path):
    """A tokenizer state's file names come from a checkpoint: a path (absolute, or with ..) is refused with a
    one-line error before anything is written, and a plain name still loads."""
    state = HFTokenizer(byte_tokenizer()).state()
    target = tmp_path / 'outside.txt'
    payload = base64.b64encode(b'export EVIL=1\n').decode()
    for name in (str(target), '../' * 12 + str(target).lstrip('/'), '..', 'sub/x.json'):
        bad = {'kind': 'hf', 'files': {name: payload, **state['files']}}
        with pytest.raises(SystemExit, match='not a plain file name'):
            tokenizer_from_state(bad)
        assert not target.exists()
    back = tokenizer_from_state({'kind': 'hf', 'files': dict(state['files'], **{'notes.txt': payload})})
    assert back.encode_chat(CONVERSATION, 2) == HFTokenizer(byte_tokenizer()).encode_chat(CONVERSATION, 2)


@pytest.mark.parametrize('kind', ['word', 'byte', 'hf'])
def test_idefics3_image_layout_wraps_the_image_tokens_and_survives_a_checkpoint(kind):
    """image_layout='idefics3': <fake_token_around_image><global-img>, the image tokens, <fake_token_around_image>
    (as SmolVLM's processor writes an image), never supervised; the layout is kept in the tokenizer's state."""
    tok = HFTokenizer(byte_tokenizer(), 'idefics3') if kind == 'hf' else Tokenizer.build(kind, TEXTS, 'idefics3')
    ids, sup = tok.encode_chat(conversation(), 3)
    fake, glob = tok.around
    start = ids.index(fake)
    assert ids[start:start + 6] == [fake, glob] + [tok.image_token_id] * 3 + [fake] and ids.count(fake) == 2
    assert not any(sup[start:start + 6])
    plain = HFTokenizer(byte_tokenizer()) if kind == 'hf' else Tokenizer.build(kind, TEXTS)
    answers = lambda t, ids, sup: t.decode([i for i, s in zip(ids, sup) if s])  # (glimpse's ids move by two)
    assert answers(tok, ids, sup) == answers(plain, *plain.encode_chat(conversation(), 3))  # the same answers
    back = tokenizer_from_state(torch.load(_saved(tok.state()), weights_only=True))
    assert back.encode_chat(conversation(), 3) == (ids, sup) and back.image_layout == 'idefics3'


def _saved(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


LABELS = ('top left', 'top', 'top right')


@pytest.mark.parametrize('kind', ['word', 'byte', 'hf'])
def test_image_token_labels_write_each_label_before_its_token_and_survive_a_checkpoint(kind):
    """image_token_labels: the prompt reads 'top left: <img>, top: <img>, ...' where '<img>' x n stood,
    unsupervised, the answers as without labels; kept in the tokenizer's state; a count that does not match the
    image tokens is a one-line config error."""
    new = lambda: HFTokenizer(byte_tokenizer()) if kind == 'hf' else \
        Tokenizer.build(kind, list(TEXTS) + label_texts(LABELS))
    tok, plain = new(), new()
    tok.image_token_labels = LABELS
    ids, sup = tok.encode_chat(conversation(), 3)
    ref, ref_sup = plain.encode_chat(conversation(), 3)
    at, img = ref.index(plain.image_token_id), plain.image_token_id
    run = [t for text in ('top left: ', ', top: ', ', top right: ') for t in tok.encode(text) + [img]]
    assert ids == ref[:at] + run + ref[at + 3:]
    assert unk_free(tok, ids) and sup == ref_sup[:at] + [False] * len(run) + ref_sup[at + 3:]
    if kind != 'word':  # the text itself (the word tokenizer decodes to words, not their spacing)
        shown = lambda t, ids: ''.join('@' if i == img else t.decode([i]) for i in ids)
        assert shown(tok, ids) == shown(plain, ref).replace('@@@', 'top left: @, top: @, top right: @')
    back = tokenizer_from_state(torch.load(_saved(tok.state()), weights_only=True))
    assert back.image_token_labels == LABELS and back.encode_chat(conversation(), 3) == (ids, sup)
    with pytest.raises(SystemExit, match='image_token_labels names 3 image tokens but the model makes 4'):
        tok.encode_chat(conversation(), 4)


def unk_free(tok, ids):
    return getattr(tok, 'unk_id', None) not in ids
