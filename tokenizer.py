"""
Tokenizers: what turns a conversation into token ids, behind one chat-encoding interface

    encode(text), decode(ids), encode_chat(turns, num_image_tokens, add_generation_prompt, grids) -> (ids, supervised),
    pad_id, eot_id, image_token_id, vocab_size, tiles, state()

    Tokenizer     glimpse's own: a word vocabulary of the training texts, or the 256 bytes of UTF-8
    HFTokenizer   a pretrained LLM's tokenizer and chat template, with '<image>' added
    HFProcessor   a whole Hugging Face VLM's processor (its chat template expands images into its own tokens)

state() is plain data that a checkpoint stores (weights_only loading); checkpoint.tokenizer_from_state
rebuilds any of them. Nothing here imports transformers: the Hugging Face objects are handed in.
"""
import base64
import os
import re
import tempfile

from errors import GlimpseError

# image_layout='idefics3': the tokens SmolVLM's (Idefics3) processor writes around an image's tokens, so that a run
# meant for export.py's Idefics3 target sees in training what the exported model sees at inference
IDEFICS3_AROUND = ('<fake_token_around_image>', '<global-img>')
IMAGE_LAYOUTS = ('plain', 'idefics3')
# image_splitting (tiling.py): Idefics3's marker before each tile, and the newlines its processor writes after
# each row of tiles ('\n') and before the global view ('\n\n' after the last row)
TILE_MARKERS = tuple(f'<row_{i}_col_{j}>' for i in range(1, 7) for j in range(1, 7))
NEWLINES = ('\n', '\n\n')


def check_image_layout(image_layout):
    if image_layout not in IMAGE_LAYOUTS:
        raise GlimpseError(f"config error: --image_layout={image_layout!r}: use one of {', '.join(IMAGE_LAYOUTS)}")


def image_run(image_token_id, n, around=None, labels=None, grid=(0, 0), tiles=None):
    """The ids one '<image>' becomes: n image placeholders; with labels (n lists of ids, label_ids), each
    placeholder after its label; with around = (fake, global) ids (Idefics3's layout), fake, global, the
    placeholders, fake. No placeholders (the bridge): nothing.
    A split image (grid = (rows, cols), not (0, 0)) in Idefics3's layout, with tiles = (the 36 tile markers'
    ids, the ids of '\n', of '\n\n'): per tile fake, <row_i_col_j>, n placeholders; '\n' after each row but
    the last, '\n\n' after it; then the global view as an unsplit image. Its processor writes the same text."""
    if not n:
        return []
    if grid != (0, 0):
        markers, newline, newlines = tiles
        rows, cols = grid
        run = []
        for i in range(rows):
            for j in range(cols):
                run += [around[0], markers[i * 6 + j]] + [image_token_id] * n
            run += newline if i < rows - 1 else newlines
        return run + image_run(image_token_id, n, around)
    if labels:
        if len(labels) != n:
            raise GlimpseError(f'config error: image_token_labels names {len(labels)} image tokens but the model '
                               f'makes {n}; give one label per image token, or none')
        run = [t for label in labels for t in label + [image_token_id]]
    else:
        run = [image_token_id] * n
    return [around[0], around[1]] + run + [around[0]] if around else run


def label_texts(labels):
    """image_token_labels ('top left', 'top', ...) -> the texts written before each image token: 'top left: ',
    ', top: ', ... (SmolVLM writes <row_1_col_1> before each tile's tokens; here words, which a pretrained LLM
    already knows)."""
    return [(', ' if i else '') + label + ': ' for i, label in enumerate(labels)]


def label_ids(tok):
    """label_texts of a tokenizer's image_token_labels, encoded (once per set of labels)."""
    labels = tuple(tok.image_token_labels)
    cached = getattr(tok, '_label_ids', None)
    if cached is None or cached[0] != labels:
        tok._label_ids = cached = (labels, [tok.encode(text) for text in label_texts(labels)])
    return cached[1]


class Tokenizer:
    """'word': a vocabulary of the words in the training texts (lower-cased, punctuation split off).
    'byte': the 256 bytes of UTF-8. Both put the special tokens first (Idefics3's two image markers after
    them with image_layout='idefics3'); tile_markers (image_splitting) adds TILE_MARKERS (and to a word
    vocabulary the two NEWLINES) last, as special tokens (so earlier runs keep their ids), which encode() then
    reads wherever they stand.
    Chat template: <bos> then for each turn <|user|> or <|assistant|>, its text, <|end|>."""
    SPECIALS = ('<pad>', '<bos>', '<|end|>', '<|user|>', '<|assistant|>', '<image>', '<unk>')
    WORD_RE = re.compile(r"<image>|[a-z0-9]+|[^\sa-z0-9]")
    TILE_RE = re.compile(r"<image>|<row_[1-6]_col_[1-6]>|\n\n|\n|[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, kind='word', words=(), image_layout='plain', tile_markers=False):
        if kind not in ('word', 'byte'):
            raise GlimpseError(f"config error: --tokenizer={kind!r}: use 'word' or 'byte'")
        check_image_layout(image_layout)
        self.kind, self.image_layout, self.tile_markers = kind, image_layout, tile_markers
        self.words = list(words)
        self.specials = self.SPECIALS + (IDEFICS3_AROUND if image_layout == 'idefics3' else ())
        self.itos = list(self.specials) + (self.words if kind == 'word' else [bytes([b]) for b in range(256)])
        # the newlines are tokens of their own in a word vocabulary (which drops whitespace); bytes already have them
        self.extras = list(TILE_MARKERS + (NEWLINES if kind == 'word' else ())) if tile_markers else []
        self.itos += self.extras  # last, after the words or bytes
        self.stoi = {s: i for i, s in enumerate(self.itos) if isinstance(s, str)}
        self.pad_id, self.bos_id, self.eot_id, self.user_id, self.assistant_id, self.image_token_id, self.unk_id = \
            range(len(self.SPECIALS))
        self.around = (len(self.SPECIALS), len(self.SPECIALS) + 1) if image_layout == 'idefics3' else None
        self.tiles = ([self.stoi[m] for m in TILE_MARKERS], self.encode(NEWLINES[0]), self.encode(NEWLINES[1])) \
            if tile_markers else None
        self.vocab_size = len(self.itos)
        self.image_token_labels = ()  # words written before each image token (label_ids); set by checkpoint.build_model

    @classmethod
    def build(cls, kind, texts, image_layout='plain', tile_markers=False):
        words = sorted({w for t in texts for w in cls.WORD_RE.findall(t.lower())} - set(cls.SPECIALS))
        return cls(kind, words if kind == 'word' else (), image_layout, tile_markers)

    def state(self):
        return {'kind': self.kind, 'words': self.words, 'image_layout': self.image_layout,
                'image_token_labels': list(self.image_token_labels), 'tile_markers': self.tile_markers}

    def encode(self, text):
        if self.kind == 'word':
            pieces = (self.TILE_RE if self.tile_markers else self.WORD_RE).findall(text.lower())
            return [self.stoi.get(w, self.unk_id) for w in pieces]
        out = []
        parts = re.split(r'(<image>|<row_[1-6]_col_[1-6]>)' if self.tile_markers else r'(<image>)', text)
        for i, part in enumerate(parts):  # odd: a special token
            out += [self.stoi[part]] if i % 2 else [len(self.specials) + b for b in part.encode()]
        return out

    def decode(self, ids):
        if self.kind == 'byte':
            raw = b''.join(self.itos[i] for i in ids if len(self.specials) <= i < len(self.specials) + 256)
            return raw.decode('utf-8', errors='replace')
        words = range(len(self.specials), len(self.itos) - len(self.extras))
        text = ' '.join(self.itos[i] for i in ids if i in words or i == self.unk_id)
        return re.sub(r" ([.,?!;:])", r"\1", text)

    def encode_chat(self, turns, num_image_tokens, add_generation_prompt=False, grids=None):
        """Turns [{'role', 'content'}] -> (ids, supervised): built segment by segment with a parallel
        mask, so the supervised tokens are exactly the assistant texts and their <|end|>. Each
        '<image>' becomes num_image_tokens placeholders (image_run); grids: the (rows, cols) of each image
        in the order they stand, for split images (None: none is split)."""
        ids, sup = [self.bos_id], [False]
        labels, images = label_ids(self), iter(grids or ())
        for turn in turns:
            assistant = turn['role'] == 'assistant'
            body = []
            for t in self.encode(turn['content']):
                body += image_run(t, num_image_tokens, self.around, labels, next(images, (0, 0)), self.tiles) \
                    if t == self.image_token_id else [t]
            ids += [self.assistant_id if assistant else self.user_id] + body + [self.eot_id]
            sup += [False] + [assistant] * (len(body) + 1)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            sup.append(False)
        return ids, sup


def bytes_to_unicode():
    """The printable stand-ins of the 256 bytes in byte-level BPE (GPT-2's table), in byte order: how the byte
    tokenizer's symbols are written for transformers (export.py) and llama.cpp (gguf_export.py)."""
    keep = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


# A chat template for models without one (GPT-2): "User: ...\nAssistant: ...<eos>\n"
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}"
                       "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}Assistant:{% endif %}")


class HFTokenizer:
    """A pretrained model's own tokenizer behind the interface of Tokenizer, with '<image>' added as a special
    token. Conversations follow the model's chat template (PLAIN_CHAT_TEMPLATE if it has none); they are
    rendered turn by turn and encoded piece by piece, so the supervised flags mark exactly the assistant
    answers and the end-of-turn token the template puts after them, which is also the generation stop token.
    glimpse pads itself (right for training, left for generation, always masked), so a model without a pad
    token pads with the end-of-turn token. image_layout='idefics3' adds Idefics3's two image markers too.
    system_prompt: None renders conversations as the template does (SmolLM2's adds its own system prompt to
    any conversation without one); a string is the system turn of every conversation that has none ('' an
    empty one: SmolLM2 then spends 4 tokens a sequence on it, not 20). It is part of the tokenizer's state,
    so training, evaluation, sample.py and classify.py all prompt the same way, as are image_token_labels."""
    IMAGE = '<image>'

    def __init__(self, hf_tokenizer, image_layout='plain', tile_markers=False):
        check_image_layout(image_layout)
        self.tok, self.image_layout, self.system_prompt = hf_tokenizer, image_layout, None
        self.tile_markers = tile_markers
        self.image_token_labels = ()  # words written before each image token (label_ids)
        if not self.tok.chat_template:
            self.tok.chat_template = PLAIN_CHAT_TEMPLATE
        needed = (self.IMAGE,) + (IDEFICS3_AROUND if image_layout == 'idefics3' else ()) + \
            (TILE_MARKERS if tile_markers else ())
        new = [t for t in needed if t not in self.tok.get_vocab()]
        if new:
            self.tok.add_tokens(new, special_tokens=True)
        self.added_ids = self.tok.convert_tokens_to_ids(new)  # their embeddings start as the mean of the rest
        self.image_token_id = self.tok.convert_tokens_to_ids(self.IMAGE)
        self.around = tuple(self.tok.convert_tokens_to_ids(list(IDEFICS3_AROUND))) if image_layout == 'idefics3' else None
        # the newlines are text here, encoded as the processor's tokenizer encodes them between two special tokens
        self.tiles = (self.tok.convert_tokens_to_ids(list(TILE_MARKERS)), self.encode(NEWLINES[0]),
                      self.encode(NEWLINES[1])) if tile_markers else None
        self.vocab_size = len(self.tok)
        self.eot_id = self._end_of_turn()
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eot_id

    def _render(self, turns, add_generation_prompt):
        if self.system_prompt is not None and not (turns and turns[0]['role'] == 'system'):
            turns = [{'role': 'system', 'content': self.system_prompt}] + list(turns)
        return self.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _end_of_turn(self):
        """The first special token the template writes after an assistant answer (<|im_end|>, <end_of_turn>...)."""
        text = self._render([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'PROBE'}], False)
        special = set(self.tok.all_special_ids) | {i for i, t in self.tok.added_tokens_decoder.items() if t.special}
        for i in self.encode(text[text.rindex('PROBE') + len('PROBE'):]):
            if i in special:
                return i
        raise GlimpseError(f'tokenizer error: the chat template of {self.tok.name_or_path} puts no special token after an assistant '
                           f'answer, so there is nothing to stop generation at')

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)  # the template writes any <bos> itself

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def encode_chat(self, turns, num_image_tokens, add_generation_prompt=False, grids=None):
        """As Tokenizer.encode_chat: (ids, supervised). Each turn is the text its rendering adds to the
        rendering of the turns before it; an assistant turn splits into the generation prompt, then the
        answer and the end-of-turn token (supervised), then what follows (a newline)."""
        ids, sup, done = [], [], ''
        labels, images = label_ids(self), iter(grids or ())

        def add(text, supervised):
            for t in self.encode(text):
                run = image_run(t, num_image_tokens, self.around, labels, next(images, (0, 0)), self.tiles) \
                    if t == self.image_token_id else [t]
                ids.extend(run)
                sup.extend([supervised] * len(run))

        for k in range(len(turns) + add_generation_prompt):
            text = self._render(turns[:k + 1], k == len(turns))
            if not text.startswith(done):
                raise GlimpseError(f'tokenizer error: the chat template of {self.tok.name_or_path} renders turn {k} differently once '
                                   f'more turns follow, so glimpse cannot encode conversations turn by turn')
            piece = text[len(done):]
            if k < len(turns) and turns[k]['role'] == 'assistant':
                header = self._render(turns[:k], True)[len(done):]
                if not piece.startswith(header):
                    raise GlimpseError(f'tokenizer error: the chat template of {self.tok.name_or_path} does not start an assistant '
                                       f'turn with its generation prompt {header!r}')
                add(header, False)
                body = self.encode(piece[len(header):])
                if self.eot_id not in body:
                    raise GlimpseError(f'tokenizer error: the chat template of {self.tok.name_or_path} ends assistant turn {k} without '
                                       f'the end-of-turn token {self.tok.convert_ids_to_tokens(self.eot_id)!r}')
                end = body.index(self.eot_id) + 1
                ids.extend(body)
                sup.extend([True] * end + [False] * (len(body) - end))
            else:
                add(piece, False)
            done = text
        return ids, sup

    def state(self):
        """The tokenizer's files (base64 strings), so a checkpoint is self-contained and loads with weights_only."""
        with tempfile.TemporaryDirectory() as d:
            self.tok.save_pretrained(d)
            files = {}
            for name in os.listdir(d):
                with open(os.path.join(d, name), 'rb') as f:
                    files[name] = base64.b64encode(f.read()).decode()
        return {'kind': 'hf', 'files': files, 'image_layout': self.image_layout, 'system_prompt': self.system_prompt,
                'image_token_labels': list(self.image_token_labels), 'tile_markers': self.tile_markers}


class HFProcessor:
    """A Hugging Face VLM's processor behind the parts of the Tokenizer interface the training scripts use.
    Conversations are rendered by the model's own chat template and images expanded into image tokens by
    the processor, as the model was trained (data.hf_collate builds the batches)."""

    def __init__(self, processor, source):
        self.processor, self.tokenizer, self.source = processor, processor.tokenizer, source
        if not getattr(processor, 'chat_template', None):
            raise GlimpseError(f'pretrained error: the processor of {source} has no chat template; glimpse renders '
                               f'conversations with the model\'s own one (use an instruction-tuned model)')
        if not self.tokenizer.is_fast:  # the answer tokens are found through character offsets
            raise GlimpseError(f'pretrained error: {source} has no fast tokenizer (tokenizer.json); hf_vlm needs one')
        self.image_token = getattr(processor, 'image_token', None)  # what its chat template writes for an image
        if self.image_token is None:
            raise GlimpseError(f'pretrained error: the processor of {source} names no image token; hf_vlm needs an '
                               f'image-text-to-text processor (SmolVLM, Idefics3, Qwen2-VL...)')
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.vocab_size = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id

    @staticmethod
    def messages(turns):
        """glimpse turns ('<image>' marks where the sample's one image goes) -> chat-template messages.
        The image stays in the first user turn even when the marker is missing (a bare question)."""
        out, placed = [], False
        for t in turns:
            text = t['content']
            if t['role'] == 'user' and not placed:
                before, _, after = text.partition('<image>') if '<image>' in text else ('', '', text)
                content = [{'type': 'text', 'text': before.strip()}] if before.strip() else []
                content += [{'type': 'image'}, {'type': 'text', 'text': after.strip()}]
                placed = True
            else:
                content = [{'type': 'text', 'text': text.replace('<image>', '').strip()}]
            out.append({'role': t['role'], 'content': content})
        return out

    def render(self, messages, add_generation_prompt=False):
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def state(self):
        return {'kind': 'hf_processor', 'source': self.source}  # the base model's processor: nothing to store
