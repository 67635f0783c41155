"""sae_fast.train.rollout: the HF rollout engine (per-row strengths, batched
rows equal rows alone, unsteered equals plain generation, errors). The vLLM
rollout backend is tested in test_train_trainer.py (importing vLLM binds the
process's threads, so it runs last)."""

import pytest
import torch

from sae_fast.sae import load_sae
from sae_fast.train.rollout import Decoding, HFRolloutEngine, RolloutError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


def test_hf_engine_rows_match_rows_alone_and_unsteered_matches_plain(tiny, task):
    from sae_fast.plan import SteeringSpec

    model, tok = tiny
    prompts = ["Please write a happy story about art.", "What is 3 plus 4? Numbers: 3 4",
               "Tell me something kind"]
    greedy = Decoding(max_new_tokens=6, do_sample=False)
    spec = SteeringSpec(features=[task.feature], mode="add", min_strength=-5, max_strength=5)
    plain = HFRolloutEngine(model, tok).generate(prompts, None, greedy)
    with HFRolloutEngine(model, tok, load_sae(task.sae_path), spec, layers=[-1]) as eng:
        rows = torch.tensor([[5.0], [-5.0], [0.0]])
        batched = eng.generate(prompts, rows, greedy)
        alone = [eng.generate([p], rows[i:i + 1], greedy)[0] for i, p in enumerate(prompts)]
        assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
        assert [c.token_ids for c in eng.generate(prompts, None, greedy)] == \
            [c.token_ids for c in plain]
        assert batched[0].token_ids != plain[0].token_ids
        assert eng.stats.failures == 0 and eng.stats.successes > 0
        with pytest.raises(RolloutError, match="2 strength rows for 3 prompts"):
            eng.generate(prompts, rows[:2], greedy)
    with pytest.raises(RolloutError, match="no SAE attached"):
        HFRolloutEngine(model, tok).generate(prompts, rows, greedy)
