"""sae_fast.train.rewards: the built-in reward functions, routing by data
source, user reward functions from files/modules, verl's default."""

import pytest

from sae_fast.train import rewards as R


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


def test_builtin_rewards():
    assert R.exact_match("d", " Paris. ", "paris") == 1.0
    assert R.exact_match("d", "so #### 42", "#### 42") == 1.0
    assert R.exact_match("d", "Rome", "Paris") == 0.0
    assert R.gsm8k("d", "3+5=8\n#### 8", "3 + 5 = 8\n#### 8") == 1.0
    assert R.gsm8k("d", "#### 1,000", "1000") == 1.0
    assert R.gsm8k("d", "the answer is 8", "#### 8") == 0.0
    assert R.gsm8k("d", "the answer is 8", "#### 8", method="flexible") == 1.0
    assert R.gsm8k("d", "#### 7", "#### 8", format_score=0.1) == 0.1
    assert R.keyword("d", "Paris is the capital.", "paris") == 1.0
    assert R.keyword("d", "red and blue", ["red", "green"]) == 0.5
    assert R.keyword("d", "happy happy sad", None, lexicon={"happy": 1, "sad": -2}) == 0.0
    assert R.keyword("d", "happy day", None, lexicon={"happy": 1}, per_word=True) == 0.5
    sets = {"up": [1, 2], "down": [3]}
    assert R.token_preference("d", "", "up", {"response_ids": [1, 2, 3, 9]}, token_sets=sets) == 0.25
    assert R.token_preference("d", "", "down", {"response_ids": [3, 3]}, token_sets=sets) == 1.0
    with pytest.raises(R.RewardError, match="response_ids"):
        R.token_preference("d", "", "up", {}, token_sets=sets)
    routed = R.RewardFunction("by_data_source", {"routes": {
        "math": {"name": "gsm8k", "kwargs": {"method": "flexible"}}}, "default": "exact_match"})
    assert routed(["math", "cap"], ["it is 4", "Rome"], ["4", "Rome"], [None, None])[0] == [1.0, 1.0]


def test_custom_reward_functions(tmp_path, monkeypatch):
    mod = tmp_path / "my_rewards.py"
    mod.write_text(
        "def score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):\n"
        "    return {'score': float(ground_truth in solution_str) + bonus, 'length': len(solution_str)}\n"
        "def two_args(a, b):\n    return 1.0\n"
        "def bad(data_source, solution_str, ground_truth, extra_info=None):\n    return 'high'\n")
    fn = R.RewardFunction(f"{mod}:score", {"bonus": 0.5})
    scores, extras = fn(["d", "d"], ["abc", "x"], ["b", "b"], [None, None])
    assert scores == [1.5, 0.5] and extras == {"length": 2.0}
    monkeypatch.syspath_prepend(str(tmp_path))
    assert R.RewardFunction("my_rewards:score")(["d"], ["b"], ["b"], [None])[0] == [1.0]
    with pytest.raises(R.RewardError, match="takes 2 positional"):
        R.RewardFunction("my_rewards:two_args")
    with pytest.raises(R.RewardError, match="expected a number"):
        R.RewardFunction("my_rewards:bad")(["d"], ["b"], ["b"], [None])
    with pytest.raises(R.RewardError, match="not found"):
        R.RewardFunction("my_rewards:nope")
    with pytest.raises(R.RewardError, match="cannot be imported"):
        R.RewardFunction("no_such_module_xyz:fn")
    with pytest.raises(R.RewardError, match="unknown reward function 'f1_score'"):
        R.RewardFunction("f1_score")


def test_verl_reward_when_available():
    try:
        import verl  # noqa: F401
    except ImportError:
        with pytest.raises(R.RewardError, match="needs verl"):
            R.RewardFunction("verl")
        return
    fn = R.RewardFunction("verl")
    scores, _ = fn(["openai/gsm8k"], ["#### 8"], ["8"], [None])
    assert scores == [1.0]


def test_vader_reward_is_vaders_compound_signed_by_the_goal(monkeypatch):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    ref = SentimentIntensityAnalyzer()
    texts = ["What a wonderful, happy day!", "This is a terrible, awful mess.", "The chair."]
    fn = R.RewardFunction("vader")
    pos, extras = fn(["t"] * 3, texts, ["positive"] * 3, [None] * 3)
    want = [ref.polarity_scores(t)["compound"] for t in texts]
    assert pos == pytest.approx(want) and want[0] > 0.5 and want[1] < -0.5 and want[2] == 0.0
    assert extras["compound"] == pytest.approx(sum(want) / 3)
    neg, _ = fn(["t"] * 3, texts, ["Negative"] * 3, [None] * 3)
    assert neg == pytest.approx([-w for w in want])
    with pytest.raises(R.RewardError, match="ground_truth 'happy'; expected 'positive'"):
        fn(["t"], ["x"], ["happy"], [None])
    monkeypatch.setattr(R, "_VADER", [])
    monkeypatch.setitem(__import__("sys").modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(R.RewardError, match="needs the vaderSentiment package"):
        fn(["t"], ["x"], ["positive"], [None])
