#!/usr/bin/env python
"""Train the SAE strength predictor with RL (a thin wrapper over `sae-fast train`).

    python examples/run_sae_ppo.py --config examples/sae_ppo_config.yaml \\
        --base-model-path /path/to/llm --sae-model-path /path/to/sae \\
        --train-data examples/data/train.jsonl --val-data examples/data/val.jsonl \\
        --strength-scale 1.0 --output-dir ./sae_outputs [--disable-sae]

Any further `sae-fast train` flag (--resume, --set section.key=value, ...)
is passed through unchanged.
"""

import argparse
import sys
from pathlib import Path

try:
    from sae_fast.cli import main as sae_fast_main
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sae_fast.cli import main as sae_fast_main


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other `sae-fast train` flags are passed through.")
    p.add_argument("--config", required=True, help="YAML config with the sae: block")
    p.add_argument("--base-model-path", required=True, help="the frozen LLM")
    p.add_argument("--sae-model-path", help="a sae-lens SAE folder (not needed with --disable-sae)")
    p.add_argument("--train-data", required=True, nargs="+", help="JSONL / parquet")
    p.add_argument("--val-data", nargs="+", help="JSONL / parquet")
    p.add_argument("--strength-scale", type=float, help="global strength scale")
    p.add_argument("--output-dir", help="checkpoints, metrics, plots")
    p.add_argument("--disable-sae", action="store_true", help="the same run without steering")
    p.add_argument("--engine", choices=["standalone", "verl"], default="standalone",
                   help="verl: train inside verl on Ray (see sae-fast train --help)")
    return p.parse_known_args(argv)


def main(argv=None):
    args, rest = parse(sys.argv[1:] if argv is None else argv)
    forwarded = ["train", "--config", args.config, "--base-model-path", args.base_model_path,
                 "--train-data", *args.train_data]
    if args.sae_model_path:
        forwarded += ["--sae-model-path", args.sae_model_path]
    if args.val_data:
        forwarded += ["--val-data", *args.val_data]
    if args.strength_scale is not None:
        forwarded += ["--strength-scale", repr(args.strength_scale)]
    if args.output_dir:
        forwarded += ["--output-dir", args.output_dir]
    if args.disable_sae:
        forwarded.append("--disable-sae")
    forwarded += ["--engine", args.engine]
    return sae_fast_main(forwarded + rest)


if __name__ == "__main__":
    sys.exit(main())
