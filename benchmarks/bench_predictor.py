"""Strength prediction cost against the user's budget of 1-5 ms per batch and
10-50 MB of predictor (pytest-benchmark, suite "predictor"), and where one
RL training step spends its time (embedding, prediction, generation with the
share inside the steering hooks, reward, update).

    pytest benchmarks/bench_predictor.py -q --benchmark-enable --benchmark-only \
        --benchmark-json=out.json
    python benchmarks/bench_predictor.py [--skip-train-step]   # markdown tables, no pytest

Predictor shapes: input = the LLM's hidden size (576 for SmolLM2-135M, 4096
for an 8B model), predictor_hidden_size 1024, predictor_layers 2, 512
features (the sizes of the user's example block). One group per (device,
model d, batch of 64 or 256 questions), timed interleaved in the same run
(``harness.record``):

    mean    BASELINE: the deterministic forward (evaluation)
    sample  forward + Gaussian sampling + log-probs (a rollout step)

Threads pinned to 1 (conftest); CUDA groups (when a GPU is present)
synchronise per call. The train-step breakdown runs the synthetic task of
``sae-fast demo`` (tiny Llama, 8 questions x 4 rollouts of 8 tokens per
step), so its absolute times say little about a real model; the shares show
that the predictor's own work is noise next to generation.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile

import pytest
import torch

from harness import machine_info, paired, record
from sae_fast.predictor import PredictorConfig, StrengthPredictor

MODELS = [("smollm2-135m", 576), ("llama-8b", 4096)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCHES = [64, 256]
HIDDEN, LAYERS, FEATURES = 1024, 2, 512
BUDGET_MS = (1.0, 5.0)
BUDGET_MB = (10.0, 50.0)


def predictor_config(d: int) -> PredictorConfig:
    return PredictorConfig(input_dim=d, num_features=FEATURES, hidden_size=HIDDEN,
                           num_layers=LAYERS)


def make_predictor(d: int, device: str = "cpu") -> StrengthPredictor:
    torch.manual_seed(0)
    return StrengthPredictor(predictor_config(d)).eval().to(device)


def op(pred: StrengthPredictor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """One prediction for the batch ``x``: ``mean`` or ``sample`` strengths
    [B, FEATURES], synchronised on CUDA."""
    with torch.no_grad():
        if kind == "mean":
            out = pred.mean_strengths(x)
        else:
            gen = torch.Generator(device=x.device).manual_seed(0) if x.is_cuda else None
            out = pred.sample(x, n=1, generator=gen)["strengths"]
        if x.is_cuda:
            torch.cuda.synchronize()
    assert out.shape == (x.shape[0], FEATURES), f"{kind}: {tuple(out.shape)}"
    return out


@pytest.fixture(autouse=True, scope="module")
def _frozen_heap():
    """Move every object alive now (torch, sae_fast) to gc's permanent
    generation: the harness's ``gc.collect()`` before its rounds then scans
    only the benchmark's own garbage (a full scan takes ~0.3 s here)."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _candidates(pred: StrengthPredictor, x: torch.Tensor) -> dict:
    return {kind: (lambda kind=kind: op(pred, x, kind)) for kind in ("mean", "sample")}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model,d", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_predict_strengths(benchmark, device, model, d, batch):
    pred = make_predictor(d, device)
    x = torch.randn(batch, d, device=device)
    res = record(benchmark, f"predictor {model} (d={d}) B={batch} {device}",
                 _candidates(pred, x), baseline="mean", suite="predictor", rounds=15,
                 target_s=0.02,
                 info=dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                           model=model, d=d, batch=batch, hidden=HIDDEN, layers=LAYERS,
                           features=FEATURES,
                           predictor_param_count=sum(p.numel() for p in pred.parameters()),
                           predictor_params_bytes=pred.num_bytes(),
                           budget_ms=list(BUDGET_MS), budget_mb=list(BUDGET_MB)))
    for kind, c in res["candidates"].items():
        benchmark.extra_info[f"{kind}_ms"] = c["median_s"] * 1e3


def train_step_breakdown(tmp_dir: str, steps: int = 5) -> dict:
    """Median seconds per phase of a training step on the synthetic task."""
    from sae_fast.config import load_config
    from sae_fast.train import Trainer
    from sae_fast.train.synthetic import build_synthetic_task

    task = build_synthetic_task(os.path.join(tmp_dir, "task"))
    vals = task.overrides()
    vals.update({"sae.predictor_hidden_size": 64, "sae.predictor_layers": 1,
                 "rollout.max_new_tokens": 8, "algorithm.n_samples": 4,
                 "trainer.batch_size": 8, "trainer.total_steps": steps + 1,
                 "trainer.output_dir": os.path.join(tmp_dir, "run"),
                 "trainer.progress_bar": False, "trainer.tensorboard": False})
    tr = Trainer(load_config(None, values=vals)).setup()
    try:
        tr.train_step()  # warm-up
        phases: dict[str, list[float]] = {}
        for _ in range(steps):
            tr.train_step()
            for k, v in tr.timings.items():
                phases.setdefault(k, []).append(v)
    finally:
        tr.close()
    return {k: statistics.median(v) for k, v in phases.items()}


def test_train_step_breakdown(benchmark, tmp_path):
    """Seconds and share of the step per phase in extra_info (3 steps after a
    warm-up step)."""
    out = {}

    def once():
        out.update(train_step_breakdown(str(tmp_path), steps=3))

    benchmark.group = "train step (synthetic task, tiny Llama, 8 questions x 4 rollouts x 8 tokens)"
    benchmark.pedantic(once, rounds=1, iterations=1)
    step = out["step"]
    benchmark.extra_info.update(suite="predictor", group=benchmark.group)
    benchmark.extra_info.update({f"{k}_s": v for k, v in out.items()})
    benchmark.extra_info.update({f"{k}_share": v / step for k, v in out.items() if k != "step"})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="predictor cost table (no pytest)")
    ap.add_argument("--skip-train-step", action="store_true",
                    help="only the prediction table (no tiny-Llama training steps)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gc.freeze()  # as _frozen_heap does for pytest
    try:
        _tables(args.skip_train_step)
    finally:
        gc.unfreeze()


def _tables(skip_train_step: bool) -> None:
    m = machine_info()
    print(f"machine: {m['cpu']}, torch {m['torch']}, 1 thread; predictor hidden {HIDDEN}, "
          f"{LAYERS} layers, {FEATURES} features; mean and sample timed interleaved")
    print("| device | model (d) | batch | size MB | mean ms | sample ms | sample/mean | budget |\n"
          "|---|---|---:|---:|---:|---:|---:|---|")
    for device, model, d in [(dev, m, d) for dev in DEVICES for m, d in MODELS]:
        pred = make_predictor(d, device)
        for batch in BATCHES:
            x = torch.randn(batch, d, device=device)
            res = paired(_candidates(pred, x), "mean", rounds=15)["candidates"]
            ms = {k: c["median_s"] * 1e3 for k, c in res.items()}
            mb = pred.num_bytes() / 2**20
            ms_ok = "within" if ms["sample"] <= BUDGET_MS[1] else "over"
            mb_ok = "within" if mb <= BUDGET_MB[1] else "over"
            print(f"| {device} | {model} ({d}) | {batch} | {mb:.1f} | {ms['mean']:.2f} | "
                  f"{ms['sample']:.2f} | {res['sample']['ratio']:.2f}x | "
                  f"time {ms_ok} 5 ms, size {mb_ok} 50 MB |")
    if skip_train_step:
        return
    with tempfile.TemporaryDirectory() as tmp:
        br = train_step_breakdown(tmp)
    step = br["step"]
    print("\ntrain step on the synthetic task (median of 5 steps, 1 thread):")
    print("| phase | ms | share of step |\n|---|---:|---:|")
    for k in ("embed", "predict", "generate", "steer", "reward", "update", "step"):
        if k in br:
            note = " (inside generate)" if k == "steer" else ""
            print(f"| {k}{note} | {br[k] * 1e3:.1f} | {100 * br[k] / step:.1f}% |")


if __name__ == "__main__":
    main()
