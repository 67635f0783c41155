"""The corpus builders' pure parts (scripts/build_demo_corpus.py, build_sentiment_corpus.py):
window packing against a direct reference, and the tone read back from each prompt."""

from __future__ import annotations

import itertools
import random

import pytest

from repo_scripts import load_script


@pytest.fixture(scope="module")
def corpus():
    return load_script("scripts/build_demo_corpus.py")


@pytest.fixture(scope="module")
def sentiment():
    return load_script("scripts/build_sentiment_corpus.py")


class _Tok:
    """A tokenizer stand-in: one id per character (enough to check the packing arithmetic)."""
    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[10 + ord(c) % 50 for c in t] for t in texts]}


@pytest.mark.parametrize("context_size", [2, 5, 17])
def test_window_packer_matches_a_flat_reference(corpus, context_size):
    rng = random.Random(context_size)
    texts = ["".join(rng.choice("abcxyz ") for _ in range(rng.randint(0, 30))) for _ in range(20)]
    tok = _Tok()
    packer = corpus.WindowPacker(tok, context_size)
    for i in range(0, len(texts), 7):  # added in uneven batches
        packer.add(texts[i:i + 7])
    flat = [t for ids in tok(texts)["input_ids"] for t in ids + [tok.eos_token_id]]
    body = context_size - 1
    want = [[tok.bos_token_id] + flat[i:i + body] for i in range(0, len(flat) - body + 1, body)]
    assert packer.windows == want


def test_tone_of_reads_the_template_not_the_topic(sentiment):
    for tone, topic, tmpl in itertools.product(sentiment.TONES, sentiment.TOPICS,
                                               sentiment.TEMPLATES):
        assert sentiment.tone_of(tmpl.format(tone=tone, topic=topic)) == tone
    assert sentiment.tone_of("Describe a lonely beach in a cheerful tone.") == "cheerful"
    with pytest.raises(ValueError, match="fits none"):
        sentiment.tone_of("Write a poem about a cat.")


def test_tones_split_into_sides(sentiment):
    assert not sentiment.POSITIVE & sentiment.NEGATIVE
    assert sentiment.POSITIVE | sentiment.NEGATIVE <= set(sentiment.TONES)
