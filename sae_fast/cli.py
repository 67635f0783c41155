"""``sae-fast`` command line.

    sae-fast train --config examples/sae_ppo_config.yaml --base-model-path M \\
        --sae-model-path S --train-data train.jsonl --val-data val.jsonl \\
        --strength-scale 1.0 --output-dir ./sae_outputs [--disable-sae] [--resume] \\
        [--set algorithm.lr=1e-3 --set rollout.max_new_tokens=32 ...]
    sae-fast generate --model M --prompt "..." [--sae S --features 3 7 --strengths 2 -1 |
                      --sae S --predictor ./sae_outputs/predictor]
    sae-fast inspect PATH          an SAE folder, a predictor folder or a checkpoint
    sae-fast plot OUTPUT_DIR       rebuild the plots of a training run
    sae-fast demo                  learned steering of SmolLM2-135M with the shipped SAE
    sae-fast demo --tiny           a short real training on a tiny local model

Bad input prints one ``error: ...`` line naming the bad value and exits 2.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from sae_fast.request import DEFAULT_MODE, MODES

log = logging.getLogger("sae_fast.cli")


def _user_errors() -> tuple:
    from sae_fast.config import ConfigError
    from sae_fast.plan import SteeringSpecError
    from sae_fast.predictor import PredictorError
    from sae_fast.sae import SAELoadError
    from sae_fast.train.checkpoint import CheckpointError
    from sae_fast.train.data import DataError
    from sae_fast.train.rewards import RewardError
    from sae_fast.train.rollout import RolloutError

    return (ConfigError, SteeringSpecError, PredictorError, SAELoadError, CheckpointError,
            DataError, RewardError, RolloutError, FileNotFoundError)


# --------------------------------------------------------------------------- train
def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON config (sections: model, sae, data, embedding, "
                   "rollout, algorithm, reward, trainer)")
    p.add_argument("--base-model-path", help="the frozen LLM (a transformers folder) -> model.path")
    p.add_argument("--sae-model-path", help="a sae-lens SAE folder -> sae.model_path")
    p.add_argument("--train-data", nargs="+", help="JSONL/JSON/parquet files -> data.train_files")
    p.add_argument("--val-data", nargs="+", help="JSONL/JSON/parquet files -> data.val_files")
    p.add_argument("--strength-scale", type=float, help="global strength scale -> sae.strength_scale")
    p.add_argument("--output-dir", help="checkpoints, metrics, plots -> trainer.output_dir")
    p.add_argument("--disable-sae", action="store_true",
                   help="the same run without SAE steering (the unsteered baseline) -> sae.enable=false")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the output dir")
    p.add_argument("--total-steps", type=int, help="-> trainer.total_steps")
    p.add_argument("--seed", type=int, help="-> trainer.seed")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads of this process (default 0 = torch's default; "
                        "results at different thread counts differ in float reduction order)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set algorithm.lr=1e-3 (repeatable)")
    p.add_argument("--engine", choices=["standalone", "verl"], default="standalone",
                   help="standalone: sae_fast's own loop (hf or vllm rollouts); verl: the same "
                        "training inside verl (vLLM rollout servers on Ray, verl's agent loop, "
                        "advantage, policy loss and tracking); with --disable-sae, verl's "
                        "standard PPO (GPUs)")
    p.add_argument("--verl-set", action="append", default=[], metavar="HYDRA_OVERRIDE",
                   help="a Hydra override of verl's ppo_trainer config, applied last "
                        "(--engine verl; repeatable)")


def config_from_args(args: argparse.Namespace):
    from sae_fast.config import load_config

    values: dict[str, Any] = {}
    flag_keys = {"base_model_path": "model.path", "sae_model_path": "sae.model_path",
                 "train_data": "data.train_files", "val_data": "data.val_files",
                 "strength_scale": "sae.strength_scale", "output_dir": "trainer.output_dir",
                 "total_steps": "trainer.total_steps", "seed": "trainer.seed"}
    for attr, key in flag_keys.items():
        v = getattr(args, attr, None)
        if v is not None:
            values[key] = v
    if getattr(args, "disable_sae", False):
        values["sae.enable"] = False
    return load_config(args.config, overrides=args.set, values=values)


def cmd_train(args: argparse.Namespace) -> int:
    from sae_fast.train.trainer import train

    cfg = config_from_args(args)  # a bad key fails here, before anything starts
    if args.threads < 0:
        from sae_fast.config import ConfigError

        raise ConfigError(f"--threads={args.threads}: expected 0 (torch's default) or a "
                          "positive thread count")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "engine", "standalone") == "verl":
        from sae_fast_verl.launch import train as verl_train

        summary = verl_train(cfg, resume=args.resume, overrides=args.verl_set,
                             disable_sae=args.disable_sae)
        print(summary["table"])
        print(f"\noutputs in {summary['output_dir']}")
        return 0
    cfg.check_for_training()
    summary = train(cfg, resume=args.resume)
    print(summary["table"])
    print(f"\noutputs in {summary['output_dir']}")
    return 0


# --------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    """Inference only: sae_fast.generate over an HF model (with a predictor's
    strengths, embedded by the unsteered model before steering is attached)."""
    from sae_fast.generate import format_prompts, generate, load_hf
    from sae_fast.plan import SteeringSpec

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [ln.rstrip("\n") for ln in Path(args.prompts_file).read_text().splitlines()
                    if ln.strip()]
    if not prompts:
        print("error: give --prompt (repeatable) or --prompts-file", file=sys.stderr)
        return 2
    pred = None
    if args.predictor:
        from sae_fast.predictor import StrengthPredictor

        pred = StrengthPredictor.load(args.predictor)
        if args.sae is None:
            args.sae = (pred.config.steering or {}).get("sae_model_path")
            if args.sae is None:
                print("error: the predictor does not record its SAE; pass --sae", file=sys.stderr)
                return 2
    if args.sae is None and args.features:
        print("error: --features needs --sae", file=sys.stderr)
        return 2
    if args.sae is not None and pred is None and not args.features:
        print("error: --sae needs --features (or --predictor)", file=sys.stderr)
        return 2
    from sae_fast.models import resolve_builtin

    args.sae = resolve_builtin(args.sae)
    model, tok = load_hf(resolve_builtin(args.model))
    texts = format_prompts(tok, prompts, args.chat)
    steer: dict = {}
    strengths = None
    if pred is not None:
        from sae_fast.train.embeddings import QuestionEmbedder

        pc, st = pred.config, pred.config.steering or {}
        lo, hi = pc.effective_bounds()
        layers = st.get("layers") or [-1]
        steer = dict(spec=SteeringSpec(
            features=pc.features or list(range(pc.num_features)),
            mode=st.get("mode", DEFAULT_MODE), max_activations=st.get("max_activations"),
            min_strength=lo, max_strength=hi, topk_mode=st.get("topk_mode", "exact")),
            layers=layers, strength_schedule=st.get("strength_schedule", "constant"))
        emb = pc.embedding or {}
        # no steering is attached yet: the question embedding is the unsteered model's
        pred.attach_embedder(QuestionEmbedder(
            model, tok, source=emb.get("source", "hidden"),
            layer=emb["layer"] if emb.get("layer") is not None else layers[0],
            exclude_special_tokens=emb.get("exclude_special_tokens", True),
            pool=emb.get("pool", "mean")))
        strengths = pred.predict_strengths(texts=texts)
    elif args.sae is not None:
        lo, hi = args.min_strength * args.strength_scale, args.max_strength * args.strength_scale
        spec = SteeringSpec(features=args.features, mode=args.mode,
                            max_activations=args.max_activations,
                            min_strength=min(lo, hi), max_strength=max(lo, hi))
        row = [v * args.strength_scale for v in (args.strengths or [1.0])]
        strengths = [row * spec.k if len(row) == 1 else row] * len(texts)
        steer = dict(spec=spec, layer=args.layer)
    sampling = dict(do_sample=True, temperature=args.temperature) if args.sample else {}
    outs = generate(model, texts, args.sae, tokenizer=tok, strengths=strengths,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, **steer, **sampling)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        s = "" if strengths is None else "  strengths=" + json.dumps(
            [round(float(x), 3) for x in strengths[i]])
        print(f"### prompt {i}{s}\n{p}\n--- completion\n{o}\n")
    return 0


# --------------------------------------------------------------------------- inspect
def _stats(t) -> str:
    t = t.float()
    return f"min {float(t.min()):.4g}  mean {float(t.mean()):.4g}  max {float(t.max()):.4g}"


def _hook_layer_or_reason(sae) -> Any:
    from sae_fast.sae import SAELoadError

    try:
        return sae.hook_layer
    except SAELoadError as err:
        return f"not steerable by default: {err}"


def inspect_sae(path: str, features: Optional[Sequence[int]] = None) -> dict:
    from sae_fast.sae import load_sae

    sae = load_sae(path)
    nbytes = sum(t.numel() * t.element_size() for t in sae.parameters())
    info = {"kind": "sae", "path": str(path), "architecture": sae.architecture, "d_in": sae.d_in,
            "d_sae": sae.d_sae, "k": sae.k, "dtype": str(sae.dtype).replace("torch.", ""),
            "hook_name": sae.hook_name, "hook_layer": _hook_layer_or_reason(sae),
            "apply_b_dec_to_input": sae.apply_b_dec_to_input,
            "normalize_activations": sae.cfg.get("normalize_activations", "none"),
            "size_mb": nbytes / 2**20,
            "decoder_norms": _stats(sae.decoder_norms()), "b_enc": _stats(sae.b_enc)}
    if sae.threshold is not None:
        info["threshold"] = _stats(sae.threshold)
    if features:
        norms = sae.decoder_norms()
        bad = [f for f in features if not 0 <= f < sae.d_sae]
        if bad:
            from sae_fast.sae import SAELoadError

            raise SAELoadError(f"feature {bad[0]} is out of range for d_sae={sae.d_sae}")
        info["features"] = {int(f): {"decoder_norm": float(norms[f]), "b_enc": float(sae.b_enc[f])}
                            for f in features}
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    from sae_fast.predictor import CONFIG_FILE, StrengthPredictor

    path = Path(args.path)
    if (path / CONFIG_FILE).is_file() or (path / "predictor" / CONFIG_FILE).is_file():
        folder = path if (path / CONFIG_FILE).is_file() else path / "predictor"
        pred = StrengthPredictor.load(folder)
        c = pred.config
        info = {"kind": "predictor", "path": str(folder), "input_dim": c.input_dim,
                "num_features": c.num_features, "hidden_size": c.hidden_size,
                "num_layers": c.num_layers, "bounds": [c.min_strength, c.max_strength],
                "strength_scale": c.strength_scale,
                "parameters": sum(p.numel() for p in pred.parameters()),
                "size_mb": pred.num_bytes() / 2**20, "features": c.features,
                "steering": c.steering, "embedding": c.embedding,
                "log_std": [round(float(x), 4) for x in pred.log_std.detach()][:16]}
        state = path / "trainer_state.json"
        if state.is_file():
            info["step"] = json.loads(state.read_text()).get("step")
    else:
        info = inspect_sae(str(path), args.features)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        w = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, float):
                v = f"{v:.4g}"
            print(f"{k:<{w}}  {v}")
    return 0


# --------------------------------------------------------------------------- plot
def cmd_plot(args: argparse.Namespace) -> int:
    from sae_fast.train.plots import make_all

    if not (Path(args.output_dir) / "metrics.jsonl").is_file():
        print(f"error: {args.output_dir} has no metrics.jsonl (not a training output dir)",
              file=sys.stderr)
        return 2
    for p in make_all(args.output_dir):
        print(p)
    return 0


# --------------------------------------------------------------------------- demo
def _print_footnote(summary: dict, run_dir: Path) -> None:
    sel = summary["validation"].get("best_constant", {}).get("selection")
    if sel:
        where = ("the validation set itself (optimistic)" if sel["split"] == "val" else
                 f"{sel['n']} training questions, not the reported validation set")
        print(f"\n(best constant = the best of {[round(g, 3) for g in sel['grid']]} by reward on "
              f"{where}; 95% CI = 1.96 * standard error over questions)")
    print(f"outputs (metrics.jsonl, samples.md, plots, checkpoints, predictor) in {run_dir}")


def cmd_demo(args: argparse.Namespace) -> int:
    """The default demo: SmolLM2-135M-Instruct + the shipped SAE + the demo task
    (``--tiny``: a tiny random Llama with a synthetic task, for quick checks)."""
    if args.tiny:
        return _demo_tiny(args)
    import tempfile
    import time

    import torch

    from sae_fast.config import load_config
    from sae_fast.train.demo_task import load_demo_task
    from sae_fast.train.trainer import train

    t0 = time.perf_counter()
    if args.threads:
        # on a shared 2-core machine two spinning threads are several times slower than one
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="sae_fast_demo_"))
    torch.manual_seed(args.seed)
    print("sae-fast demo: SmolLM2-135M-Instruct (converted once into the cache), the shipped "
          f"SAE and the demo task; outputs in {out}")
    task = load_demo_task(args.sae_dir, args.data_dir)
    ev = task.evidence.get("final_probe", {})
    print(f"task: 'up' questions ask for the word {task.word!r}, 'down' questions forbid it; "
          f"reward = share of generated tokens in the 'up' set minus the 'down' set (swapped for "
          f"'down'); SAE feature {task.feature} at layer {task.layer}, add mode, |S| <= "
          f"{task.strength:.1f}")
    if ev:
        print(f"  probe: 'up'-token share {ev['up_mass']['zero']:.3f} unsteered -> "
              f"{ev['up_mass']['plus']:.3f} at +S, {ev['up_mass']['minus']:.3f} at -S")
    values = task.overrides()
    values.update({
        "sae.predictor_hidden_size": 64, "sae.predictor_layers": 1,
        "rollout.max_new_tokens": args.max_new_tokens, "rollout.max_batch": 64,
        "algorithm.name": args.algorithm, "algorithm.n_samples": 4, "algorithm.lr": 1e-2,
        "trainer.batch_size": 8, "trainer.total_steps": args.steps or 30, "trainer.val_every": 0,
        "trainer.val_before_train": False,
        "trainer.save_every": 10, "trainer.seed": args.seed,
        "trainer.output_dir": str(out / "run"), "trainer.progress_bar": not args.no_progress,
    })
    cfg = load_config(None, overrides=args.set, values=values)
    if args.engine == "verl":
        from sae_fast_verl.launch import train as verl_train

        summary = verl_train(cfg, resume=args.resume, overrides=args.verl_set)
    else:
        summary = train(cfg, resume=args.resume)
    print()
    print(summary["table"])
    _print_footnote(summary, out / "run")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _demo_tiny(args: argparse.Namespace) -> int:
    """A short real RL run on a tiny local Llama with a synthetic reward."""
    import tempfile
    import time

    import torch

    from sae_fast.config import load_config
    from sae_fast.train.synthetic import build_synthetic_task
    from sae_fast.train.trainer import train

    t0 = time.perf_counter()
    # A 128-wide model gains nothing from intra-op threads, and on a loaded
    # machine two spinning threads slow it down by an order of magnitude.
    torch.set_num_threads(1)
    out = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="sae_fast_demo_"))
    torch.manual_seed(args.seed)
    print(f"sae-fast demo --tiny: building a tiny Llama, a random SAE and a synthetic task in {out}")
    task = build_synthetic_task(out / "task", seed=args.seed)
    print("task: 'up' questions reward tokens that pushing SAE feature "
          f"{task.feature} up promotes, 'down' questions the opposite "
          f"(probe: up-token share {task.evidence['up_mass']['zero']:.2f} unsteered -> "
          f"{task.evidence['up_mass']['plus']:.2f} at +5)")
    values = task.overrides()
    values.update({
        "sae.predictor_hidden_size": 64, "sae.predictor_layers": 1,
        "rollout.max_new_tokens": 8, "rollout.max_batch": 64,
        "algorithm.name": args.algorithm, "algorithm.n_samples": 4, "algorithm.lr": 1e-2,
        "trainer.batch_size": 8, "trainer.total_steps": args.steps or 40, "trainer.val_every": 10,
        "trainer.save_every": 10, "trainer.seed": args.seed,
        "trainer.output_dir": str(out / "run"), "trainer.progress_bar": not args.no_progress,
    })
    cfg = load_config(None, overrides=args.set, values=values)
    summary = train(cfg)
    print()
    print(summary["table"])
    _print_footnote(summary, out / "run")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-fast", description="SAE feature steering with "
                                "RL-trained per-question strengths")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the strength predictor with RL (frozen LLM)")
    add_train_flags(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text, optionally steered")
    g.add_argument("--model", required=True,
                   help="a transformers model folder, or builtin:smollm2")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help="one prompt per line")
    g.add_argument("--sae", help="a sae-lens SAE folder")
    g.add_argument("--features", type=int, nargs="+", help="SAE feature indices to steer")
    g.add_argument("--strengths", type=float, nargs="+", help="one per feature, or one for all")
    g.add_argument("--max-activations", type=float, nargs="+")
    g.add_argument("--mode", default=DEFAULT_MODE, choices=MODES,
                   help=f"steering mode (default {DEFAULT_MODE})")
    g.add_argument("--layer", type=int, help="decoder layer (negative counts from the end)")
    g.add_argument("--strength-scale", type=float, default=1.0)
    g.add_argument("--min-strength", type=float, default=-5.0)
    g.add_argument("--max-strength", type=float, default=5.0)
    g.add_argument("--predictor", help="a trained predictor folder: per-prompt strengths")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="summarise an SAE folder, a predictor or a checkpoint")
    i.add_argument("path")
    i.add_argument("--features", type=int, nargs="+", help="also show these features")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    pl = sub.add_parser("plot", help="rebuild the plots of a training output dir")
    pl.add_argument("output_dir")
    pl.set_defaults(func=cmd_plot)

    sv = sub.add_parser("serve", add_help=False,
                        help="vLLM's OpenAI server with SAE steering (sae-fast serve MODEL --sae "
                             "PATH --layer L --features F... [vLLM flags]; serve --help for more)")
    sv.set_defaults(func=None)

    d = sub.add_parser("demo", help="learn per-question steering of SmolLM2-135M with the shipped "
                       "SAE (CPU, about 4 min on 2 cores); --tiny: a tiny random model")
    d.add_argument("--output-dir", help="default: a new temporary folder")
    d.add_argument("--engine", choices=["standalone", "verl"], default="standalone",
                   help="verl: the same job inside verl (vLLM rollout servers on Ray)")
    d.add_argument("--verl-set", action="append", default=[], metavar="HYDRA_OVERRIDE",
                   help="a Hydra override of verl's config (--engine verl)")
    d.add_argument("--tiny", action="store_true",
                   help="tiny random Llama + random SAE + synthetic task (quick check)")
    d.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 30 for SmolLM2, 40 with --tiny)")
    d.add_argument("--max-new-tokens", type=int, default=16, help="SmolLM2 demo only")
    d.add_argument("--sae-dir", default=None,
                   help="SmolLM2 demo: SAE folder holding demo_task.json (default: the shipped "
                   "one, package data sae_fast/assets/smollm2_sae)")
    d.add_argument("--data-dir", default=None,
                   help="SmolLM2 demo: folder of demo_{train,val}.jsonl (default: the shipped "
                   "ones, package data sae_fast/assets/demo_data)")
    d.add_argument("--resume", action="store_true",
                   help="SmolLM2 demo: continue from the latest checkpoint in --output-dir")
    d.add_argument("--threads", type=int, default=0,
                   help="torch threads for the SmolLM2 demo (default 0 = torch's default, one "
                   "per core; on a busy machine 1 is faster)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--algorithm", default="grpo", choices=["grpo", "ppo", "reinforce"])
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # every flag we do not know goes to vLLM's server unchanged
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from sae_fast.backends.vllm_engine.serve import run

        try:
            return run(argv[1:])
        except _user_errors() as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("matplotlib", "PIL", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not faulthandler.is_enabled():
        # a native crash (segfault in torch/tokenizers/an extension) then leaves
        # the Python stack of every thread on stderr instead of a bare exit code
        faulthandler.enable(all_threads=True)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
