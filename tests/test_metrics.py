"""EM and token F1 against hand-computed cases (SQuAD normalisation; CJK scored per character)."""

import pytest

from trainers.metrics import answer_tokens, best_over_references, exact_match, normalize, token_f1


@pytest.mark.parametrize("text, expected", [
    ("The Cat, sat!", "cat sat"),
    ("  An   apple\ta day ", "apple day"),
    ("theater another", "theater another"),  # articles only as whole words
    ("Velora Quennik lives in Dastrel.", "velora quennik lives in dastrel"),
    ("“Quoted” — dash’s", "quoted dash s"),  # Unicode punctuation too
])
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_cjk_characters_are_tokens_and_chinese_punctuation_goes():
    assert answer_tokens("北京大学。") == ["北", "京", "大", "学"]
    assert answer_tokens("我在Tarsk住，好！") == ["我", "在", "tarsk", "住", "好"]
    assert answer_tokens("東京タワー") == ["東", "京", "タ", "ワ", "ー"]


@pytest.mark.parametrize("prediction, reference, em, f1", [
    ("The Cat sat.", "cat sat", 1.0, 1.0),
    ("the cat sat on the mat", "a cat sat", 0.0, 2 * 0.5 * 1.0 / 1.5),  # tokens cat sat on mat vs cat sat
    ("cat cat", "cat", 0.0, 2 * 0.5 * 1.0 / 1.5),  # shared tokens counted as a multiset: 1
    ("dog", "cat", 0.0, 0.0),
    ("北京大学", "北京", 0.0, 2 * 0.5 * 1.0 / 1.5),  # 2 of 4 characters predicted, both of the reference's
    ("北京 大学。", "北京大学", 1.0, 1.0),  # spaces and 。 do not matter
    ("上海", "北京", 0.0, 0.0),
    ("", "cat", 0.0, 0.0),  # an empty prediction
    ("", "", 1.0, 1.0),
    ("...", "", 1.0, 1.0),  # punctuation only normalises to empty
])
def test_em_and_f1(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_best_over_references():
    assert best_over_references(token_f1, "the cat", ["dog", "a cat"]) == 1.0
    assert best_over_references(exact_match, "cat", ["dog", "bird"]) == 0.0
