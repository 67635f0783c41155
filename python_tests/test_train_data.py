"""sae_fast.train.data: JSONL/parquet loading (fields, aliases, errors naming
file and line), the batch schedule, chat-template prompt formatting."""

import json

import pytest

from sae_fast.train.data import BatchSchedule, DataError, format_prompt, load_dataset


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


def test_jsonl_fields_and_aliases(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([
        json.dumps({"prompt": "a?", "answer": "1"}),
        "",
        json.dumps({"question": "b?", "ground_truth": ["x", "y"], "data_source": "src"}),
        json.dumps({"prompt": [{"role": "user", "content": "c?"}],
                    "reward_model": {"ground_truth": "3"}, "extra_info": {"i": 2}}),
    ]) + "\n")
    ex = load_dataset(p)
    assert [e.prompt for e in ex[:2]] == ["a?", "b?"]
    assert ex[0].data_source == "d" and ex[1].data_source == "src"
    assert ex[1].ground_truth == ["x", "y"] and ex[2].ground_truth == "3"
    assert ex[2].extra_info == {"i": 2} and isinstance(ex[2].prompt, list)
    assert [e.index for e in ex] == [0, 1, 2]
    assert len(load_dataset([p, p], max_samples=4)) == 4


@pytest.mark.parametrize("lines,match", [
    (['{"prompt": "a", "answer": 1}', '{"prompt": "b", "answer": '], r"d\.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "answer": 1}', '', '{"answer": 1}'], r"d\.jsonl:3: no prompt field"),
    (['{"prompt": "a"}'], r"d\.jsonl:1: no answer field"),
    (['[1, 2]'], r"d\.jsonl:1: expected a JSON object"),
    (['{"prompt": "  ", "answer": 1}'], "prompt is empty"),
    (['{"prompt": 5, "answer": 1}'], "must be a string or a list"),
])
def test_malformed_lines_name_file_and_line(tmp_path, lines, match):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        load_dataset(p)


def test_missing_and_unknown_data_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset(tmp_path / "x.csv")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_dataset(tmp_path / "e.jsonl")


def test_verl_style_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame([
        {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "1+1?"}],
         "ability": "math", "reward_model": {"style": "rule", "ground_truth": "2"},
         "extra_info": {"split": "train", "index": 0}},
        {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "2+2?"}],
         "ability": "math", "reward_model": {"style": "rule", "ground_truth": "4"},
         "extra_info": {"split": "train", "index": 1}},
    ])
    frame.to_parquet(tmp_path / "t.parquet")
    ex = load_dataset(tmp_path / "t.parquet")
    assert ex[1].prompt == [{"role": "user", "content": "2+2?"}]
    assert ex[1].ground_truth == "4" and ex[1].data_source == "openai/gsm8k"
    assert ex[0].extra_info["index"] == 0
    pd.DataFrame([{"prompt": "x"}]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: row 0: no answer field"):
        load_dataset(tmp_path / "bad.parquet")


def test_batch_schedule_is_a_pure_function_of_seed_and_step():
    a, b = BatchSchedule(10, 4, seed=3), BatchSchedule(10, 4, seed=3)
    assert [a.batch(s) for s in range(6)] == [b.batch(s) for s in reversed(range(6))][::-1]
    first_epoch = a.batch(0) + a.batch(1) + a.batch(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert BatchSchedule(10, 4, seed=4).batch(0) != a.batch(0) or \
        BatchSchedule(10, 4, seed=4).batch(1) != a.batch(1)
    assert a.steps_for_epochs(2) == 5


def test_format_prompt_chat_template_modes(tiny):
    from sae_fast.train.data import Example

    _, tok = tiny
    ex = Example(prompt="hi", ground_truth="x", data_source="d")
    assert format_prompt(ex, tok, "auto") == "hi"  # the tiny tokenizer has no template
    with pytest.raises(DataError, match="no chat template"):
        format_prompt(ex, tok, "always")
