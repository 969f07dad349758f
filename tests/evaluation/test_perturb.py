"""Robustness perturbations: rate 0 is the identity; rate r changes round(r x eligible) characters."""

import numpy as np
import pytest

from hnet.evaluation.perturb import PERTURBATIONS, has_other_case, perturb

# Mixed text: ASCII, accented letters, CJK, emoji (4-byte UTF-8), tabs and newlines.
TEXT = (
    "The quick brown fox jumps over the lazy dog.\tÉlan vital — naïve façade!\n数据压缩 and 🙂 emoji; ÀÉÎÕÜ àéîõü ß.\n"
) * 20
RATES = (0.01, 0.05, 0.2, 0.5)
# No two adjacent characters equal, so repeats and swaps are visible where they happen.
DISTINCT_NEIGHBOURS = "".join(np.random.default_rng(0).permutation(list("abcdefghijklmnopqrstuvwxyz数据压缩🙂é"))) * 40


def chars_of(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_rate_zero_is_the_identity(kind):
    for text in (TEXT.encode(), b"", b"\xff\xfe broken \xc3 utf-8 \xe2\x82"):
        assert perturb(text, kind, 0.0, seed=3) == text


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_output_is_valid_utf8_deterministic_and_seeded(kind):
    text = TEXT.encode()
    out = perturb(text, kind, 0.1, seed=1)
    out.decode("utf-8")  # no character was split
    assert out == perturb(text, kind, 0.1, seed=1)
    assert out != perturb(text, kind, 0.1, seed=2)


@pytest.mark.parametrize("rate", RATES)
def test_case_flips_round_rate_of_the_cased_letters(rate):
    out = chars_of(perturb(TEXT.encode(), "case", rate, seed=0))
    eligible = [i for i, c in enumerate(TEXT) if has_other_case(c)]
    assert len(out) == len(TEXT)
    changed = [i for i, (a, b) in enumerate(zip(TEXT, out)) if a != b]
    assert set(changed) <= set(eligible)
    assert all(out[i] == TEXT[i].swapcase() for i in changed)
    assert len(changed) == round(rate * len(eligible))


@pytest.mark.parametrize("rate", RATES)
def test_drops_delete_round_rate_of_the_characters(rate):
    out = chars_of(perturb(TEXT.encode(), "drop", rate, seed=0))
    assert len(TEXT) - len(out) == round(rate * len(TEXT))
    remaining = iter(TEXT)
    assert all(c in remaining for c in out)  # what is left is the input with characters removed


@pytest.mark.parametrize("rate", RATES)
def test_repeats_double_round_rate_of_the_characters(rate):
    out = chars_of(perturb(DISTINCT_NEIGHBOURS.encode(), "repeat", rate, seed=0))
    doubled = sum(a == b for a, b in zip(out, out[1:]))
    assert doubled == len(out) - len(DISTINCT_NEIGHBOURS) == round(rate * len(DISTINCT_NEIGHBOURS))
    assert "".join(c for i, c in enumerate(out) if i == 0 or out[i - 1] != c) == DISTINCT_NEIGHBOURS


@pytest.mark.parametrize("rate", RATES)
def test_swaps_move_about_rate_of_the_characters(rate):
    text = DISTINCT_NEIGHBOURS  # every swap changes exactly two positions
    out = chars_of(perturb(text.encode(), "swap", rate, seed=0))
    assert sorted(out) == sorted(text)
    changed = [i for i, (a, b) in enumerate(zip(text, out)) if a != b]
    pairs = round(rate * len(text) / 2)
    assert len(changed) == 2 * pairs
    assert changed[0::2] == [i - 1 for i in changed[1::2]]  # changes come in adjacent pairs
    assert all(out[i] == text[i + 1] and out[i + 1] == text[i] for i in changed[0::2])


@pytest.mark.parametrize("rate", RATES)
def test_whitespace_noise_only_touches_whitespace(rate):
    def strip(s):
        return "".join(c for c in s if not c.isspace())

    out = chars_of(perturb(TEXT.encode(), "whitespace", rate, seed=0))
    assert strip(out) == strip(TEXT)
    # Without whitespace every chosen character gets a space; with only whitespace each is deleted.
    no_space = strip(TEXT)
    assert len(chars_of(perturb(no_space.encode(), "whitespace", rate, seed=0))) - len(no_space) == round(
        rate * len(no_space)
    )
    spaces = " \t\n" * 100
    assert len(spaces) - len(chars_of(perturb(spaces.encode(), "whitespace", rate, seed=0))) == round(
        rate * len(spaces)
    )


def test_invalid_utf8_bytes_are_kept_as_they_are():
    text = b"ok \xff\xfe bad \xc3 cut \xe2\x82 end " * 30  # invalid UTF-8, ASCII otherwise
    assert perturb(text, "case", 0.5, seed=0).lower() == text.lower()
    assert perturb(text, "whitespace", 0.5, seed=0).replace(b" ", b"") == text.replace(b" ", b"")
    assert set(perturb(text, "drop", 0.5, seed=0)) <= set(text)  # each invalid byte is one character
    assert set(perturb(text, "repeat", 0.5, seed=0)) == set(text)
    assert sorted(perturb(text, "swap", 0.5, seed=0)) == sorted(text)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(b"abc", "shuffle", 0.1)
    with pytest.raises(ValueError, match="rate"):
        perturb(b"abc", "drop", 1.5)
