import math

from training import bleu4, cider_d


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
