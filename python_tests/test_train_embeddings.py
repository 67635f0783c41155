"""sae_fast.train.embeddings: question embeddings (masked mean of a layer's
output, input embeddings, caching), unsteered even with steering attached."""

import pytest
import torch

from sae_fast.sae import load_sae
from sae_fast.train.rollout import HFRolloutEngine


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


def test_hidden_embedding_is_masked_mean_of_the_layer_output(tiny):
    from sae_fast.train.embeddings import QuestionEmbedder

    model, tok = tiny
    texts = ["What is the capital of France?", "Numbers: one two"]
    emb = QuestionEmbedder(model, tok, layer=1, exclude_special_tokens=False)
    got = emb.embed_texts(texts)
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states[2]  # output of layer 1
    m = enc["attention_mask"][..., None].float()
    ref = (hs * m).sum(1) / m.sum(1)
    assert torch.allclose(got, ref, atol=1e-4)
    assert emb.misses == 2
    emb.embed_texts(texts[:1])
    assert emb.hits == 1
    inp = QuestionEmbedder(model, tok, source="input_embeddings").embed_texts(texts[1:])
    ids = tok(texts[1:], return_tensors="pt")["input_ids"]
    assert torch.allclose(inp[0], model.get_input_embeddings().weight[ids[0]].mean(0), atol=1e-5)


def test_last_token_pool_is_the_unpadded_last_position(tiny):
    """pool="last": each prompt's layer output at its own last token, the same
    as running it alone (no padding), whatever the batch's padding side."""
    from sae_fast.train.embeddings import QuestionEmbedder

    model, tok = tiny
    texts = ["What is the capital of France?", "Hi", "Numbers: one two three four"]
    emb = QuestionEmbedder(model, tok, layer=1, pool="last", cache=False)
    got = emb.embed_texts(texts)
    for i, t in enumerate(texts):
        enc = tok([t], return_tensors="pt")
        with torch.no_grad():
            alone = model(**enc, output_hidden_states=True).hidden_states[2][0, -1]
        assert torch.allclose(got[i], alone, atol=1e-4), i
    enc = tok(texts, return_tensors="pt", padding=True)
    right = {k: v for k, v in enc.items()}
    if tok.padding_side == "left":  # the same rows right-padded
        tok.padding_side = "right"
        right = tok(texts, return_tensors="pt", padding=True)
        tok.padding_side = "left"
    assert torch.allclose(emb.embed_ids(right["input_ids"], right["attention_mask"]), got, atol=1e-4)
    assert emb.describe()["pool"] == "last"
    with pytest.raises(ValueError, match="pool='max'; expected one of mean, last"):
        QuestionEmbedder(model, tok, pool="max")


def test_embeddings_are_unsteered_even_with_steering_attached(tiny, task):
    from sae_fast.plan import SteeringSpec
    from sae_fast.train.embeddings import QuestionEmbedder

    model, tok = tiny
    clean = QuestionEmbedder(model, tok, layer=-1).embed_texts(["Please write a happy story"])
    spec = SteeringSpec(features=[task.feature], mode="add", min_strength=-5, max_strength=5)
    with HFRolloutEngine(model, tok, load_sae(task.sae_path), spec, layers=[1]) as eng:
        eng.steerer.set_strengths([[5.0]])
        guarded = QuestionEmbedder(model, tok, layer=-1, guard=eng.unsteered)
        assert torch.allclose(guarded.embed_texts(["Please write a happy story"]), clean, atol=1e-6)
        assert eng.steerer.enabled
