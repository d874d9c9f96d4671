import math

from metrics import bleu4, cider_d


def test_bleu4_hand_computed():
    assert bleu4(['the cat sat on the mat'], [['the cat sat on the mat']]) == 1.0
    # unigram 5/5, bigram 3/4, trigram 2/3, 4-gram 1/2; brevity penalty exp(1 - 6/5)
    expected = math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert math.isclose(bleu4(['the cat sat on mat'], [['the cat sat on the mat']]), expected, rel_tol=1e-12)
    # clipping: "the" counts once, and no bigram matches, so BLEU-4 is 0
    assert bleu4(['the the the the'], [['the cat']]) == 0.0
    # the reference closest in length (6 words, not 2) sets the brevity penalty; case and punctuation ignored
    assert math.isclose(bleu4(['The cat sat on the mat.'], [['a dog', 'the cat sat on the mat']]), 1.0)


def test_cider_d_hand_computed():
    # two images; "a" occurs in every image's references, so its IDF is 0. Every other n-gram has IDF log 2.
    # image 1: cosine 0.5 for unigrams ({red, square} vs {red, circle}) and bigrams, 0 for trigrams,
    # nothing for 4-grams -> 10 * (0.5 + 0.5) / 4 = 2.5. image 2 equals its reference: 10 * 3 / 4 = 7.5.
    score = cider_d(['a red square', 'a blue square'], [['a red circle'], ['a blue square']])
    assert math.isclose(score, 5.0, rel_tol=1e-12)
    # the Gaussian length penalty: a longer candidate with the same clipped matches scores lower
    longer = cider_d(['a red square and more words here', 'a blue square'], [['a red circle'], ['a blue square']])
    assert longer < score
    assert cider_d(['x y z', 'p q r'], [['a red circle'], ['a blue square']]) == 0.0


def test_reasoning_answers_are_scored_by_the_class_they_name(shapes_dir, tmp_path):
    """After classify.py --mode=convert --reasoning=True a right answer is one naming the right class, whatever
    its reasoning (an exact match of the whole 'Reasoning: ... Answer: ...' string was all but never right)."""
    from contextlib import nullcontext

    import classify
    from data import VLMDataset
    from metrics import qa_accuracy
    shapes = ['circle', 'square', 'triangle', 'diamond', 'cross']
    classify.convert_dataset(shapes_dir, str(tmp_path / 'cls'), shapes, 'what shape is the large object?',
                             reasoning=True)
    ds = VLMDataset(str(tmp_path / 'cls'), 'val')

    class Scripted:  # reasons in its own words, then names the right class, or the next one
        def __init__(self, shift):
            self.classes, self.room = iter([shapes[(r['label'] + shift) % 5] for r in ds.records]), []

        def chat(self, tok, images, prompts, max_new_tokens):
            self.room.append(max_new_tokens)
            return [f'Reasoning: I looked closely at it. Answer: {next(self.classes)}.' for _ in prompts]

    right = Scripted(0)
    assert qa_accuracy(right, ds, None, 'cpu', nullcontext) == ({'class': 1.0, 'all': 1.0}, len(ds.records))
    assert min(right.room) > 2 * len(ds.records[0]['qa'][0]['a'].split())  # room for the whole answer
    assert qa_accuracy(Scripted(1), ds, None, 'cpu', nullcontext)[0]['all'] == 0.0
