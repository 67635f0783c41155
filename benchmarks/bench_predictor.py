"""Strength prediction cost (pytest-benchmark) against the user's budget of
1-5 ms per batch and 10-50 MB of predictor, and where one RL training step
spends its time (embedding, prediction, generation with the share inside the
steering hooks, reward, update).

    pytest benchmarks/bench_predictor.py --benchmark-enable --benchmark-json=out.json
    python benchmarks/bench_predictor.py          # a markdown table, no pytest

Predictor shapes: input = the LLM's hidden size (576 for SmolLM2-135M, 4096
for an 8B model), predictor_hidden_size 1024, predictor_layers 2, 512
features (the sizes of the user's example block). Batches of 64 and 256
questions. ``mean`` = the deterministic forward (evaluation); ``sample`` =
forward + Gaussian sampling + log-probs (a rollout step). Threads pinned to 1;
CUDA rows (when a GPU is present) synchronise per call.
The train-step breakdown runs the synthetic task of ``sae-fast demo`` (tiny
Llama, 32 rollouts of 8 tokens per step), so its absolute times say little
about a real model; the shares show that the predictor's own work is noise
next to generation.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import pytest
import torch

from sae_fast.predictor import PredictorConfig, StrengthPredictor

MODELS = [("smollm2-135m", 576), ("llama-8b", 4096)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCHES = [64, 256]
HIDDEN, LAYERS, FEATURES = 1024, 2, 512
BUDGET_MS = (1.0, 5.0)
BUDGET_MB = (10.0, 50.0)


def make_predictor(d: int, device: str = "cpu") -> StrengthPredictor:
    torch.manual_seed(0)
    return StrengthPredictor(PredictorConfig(input_dim=d, num_features=FEATURES,
                                             hidden_size=HIDDEN, num_layers=LAYERS)).eval().to(device)


def op(pred: StrengthPredictor, x: torch.Tensor, kind: str):
    with torch.no_grad():
        if kind == "mean":
            out = pred.mean_strengths(x)
        else:
            gen = torch.Generator(device=x.device).manual_seed(0) if x.is_cuda else None
            out = pred.sample(x, n=1, generator=gen)["strengths"]
        if x.is_cuda:
            torch.cuda.synchronize()
        return out


def _info(benchmark, pred, d, batch):
    benchmark.extra_info.update(
        machine=platform.processor() or platform.machine(), torch=torch.__version__,
        threads=torch.get_num_threads(), input_dim=d, batch=batch, hidden=HIDDEN,
        layers=LAYERS, features=FEATURES, size_mb=pred.num_bytes() / 2**20,
        budget_ms=list(BUDGET_MS), budget_mb=list(BUDGET_MB),
        params=sum(p.numel() for p in pred.parameters()))


@pytest.mark.parametrize("kind", ["mean", "sample"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model,d", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_predict_strengths(benchmark, device, model, d, batch, kind):
    pred = make_predictor(d, device)
    x = torch.randn(batch, d, device=device)
    op(pred, x, kind)  # warm-up
    benchmark.group = f"predictor {model} (d={d}) B={batch} {device}"
    _info(benchmark, pred, d, batch)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    benchmark(op, pred, x, kind)
    benchmark.extra_info["median_ms"] = benchmark.stats.stats.median * 1e3


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
    """One number per phase in extra_info (shares of the step). One thread:
    the tiny model gains nothing from more, and two spin against each other
    on this shared machine."""
    out = {}

    def once():
        out.update(train_step_breakdown(str(tmp_path / f"r{len(os.listdir(tmp_path))}"), steps=3))

    benchmark.group = "train step (synthetic task, tiny Llama, 32 rollouts x 8 tokens)"
    benchmark.pedantic(once, rounds=1, iterations=1)
    step = out["step"]
    benchmark.extra_info.update({f"{k}_s": v for k, v in out.items()})
    benchmark.extra_info.update({f"{k}_share": v / step for k, v in out.items() if k != "step"})


def main(argv=None) -> None:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="predictor cost table (no pytest)")
    ap.add_argument("--skip-train-step", action="store_true",
                    help="only the prediction table (no tiny-Llama training steps)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"1 thread; predictor hidden {HIDDEN}, {LAYERS} layers, {FEATURES} features")
    print("| device | model (d) | batch | size MB | mean ms | sample ms | budget |\n"
          "|---|---|---:|---:|---:|---:|---|")
    for device, model, d in [(dev, m, d) for dev in DEVICES for m, d in MODELS]:
        pred = make_predictor(d, device)
        for batch in BATCHES:
            x = torch.randn(batch, d, device=device)
            res = {}
            for kind in ("mean", "sample"):
                op(pred, x, kind)
                ts = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    op(pred, x, kind)
                    ts.append(time.perf_counter() - t0)
                res[kind] = statistics.median(ts) * 1e3
            mb = pred.num_bytes() / 2**20
            ms_ok = "within" if res["sample"] <= BUDGET_MS[1] else "over"
            mb_ok = "within" if mb <= BUDGET_MB[1] else "over"
            print(f"| {device} | {model} ({d}) | {batch} | {mb:.1f} | {res['mean']:.2f} | "
                  f"{res['sample']:.2f} | time {ms_ok} 5 ms, size {mb_ok} 50 MB |")
    if args.skip_train_step:
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
