"""sae_fast.train.checkpoint: save/load round trip, pruning, corruption
detection, never half written."""

import pytest
import torch

from sae_fast.train.checkpoint import CheckpointError, CheckpointManager


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models on one intra-op thread (see conftest.one_thread_module)."""


def _small_predictor(seed=0):
    from sae_fast.predictor import PredictorConfig, StrengthPredictor

    torch.manual_seed(seed)
    return StrengthPredictor(PredictorConfig(input_dim=8, num_features=2, hidden_size=8))


def test_checkpoint_roundtrip_prune_and_corruption(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    p = _small_predictor()
    opt = torch.optim.AdamW(p.parameters(), lr=0.1)
    p(torch.randn(2, 8)).mean.sum().backward()
    opt.step()
    for step in (1, 2, 3):
        mgr.save(step, p, opt, {"x": step})
    assert [c.name for c in mgr.list()] == ["step_00000002", "step_00000003"]
    ck = mgr.load()
    assert ck["state"]["step"] == 3 and ck["state"]["x"] == 3
    for (k, v), (k2, v2) in zip(p.state_dict().items(), ck["predictor"].state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    saved, live = ck["optimizer"]["state"], opt.state_dict()["state"]
    assert saved.keys() == live.keys() and all(
        torch.equal(saved[i]["exp_avg"], live[i]["exp_avg"]) for i in live)
    bad = tmp_path / "ck" / "step_00000003" / "optimizer.pt"
    bad.write_bytes(bad.read_bytes()[:-7] + b"garbage")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: contents do not match"):
        mgr.load()
    (tmp_path / "ck" / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.latest()


def test_checkpoint_never_half_written(tmp_path, monkeypatch):
    import sae_fast.train.checkpoint as ckmod

    mgr = CheckpointManager(tmp_path / "ck")
    p = _small_predictor()
    mgr.save(1, p, None, {})

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckmod.torch, "save", crash)
    opt = torch.optim.AdamW(p.parameters())
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, p, opt, {})
    monkeypatch.undo()
    assert [c.name for c in mgr.list()] == ["step_00000001"]
    assert mgr.latest().name == "step_00000001"
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    # a folder left by a SIGKILL mid-save is invisible and cleaned on the next start
    (tmp_path / "ck" / ".tmp-step_00000002-x").mkdir()
    (tmp_path / "ck" / "step_00000005").mkdir()  # no manifest: incomplete
    mgr2 = CheckpointManager(tmp_path / "ck")
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    assert [c.name for c in mgr2.list()] == ["step_00000001"]
    assert mgr2.load()["state"]["step"] == 1
