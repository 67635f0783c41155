"""Compute the numbers of the demo SAE's card and write ``CARD.md`` + ``card.json``.

Every number on the card comes from this script (nothing typed by hand):

- L0: mean number of active features per token;
- explained variance: ``1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2`` over
  held-out windows, positions >= 4 and non-special tokens only (positions
  0-3 hold a few huge-norm tokens that would dominate the sum);
- dead fraction: features that never fire on the held-out sample;
- for a few features: top-activating tokens (with context) and the tokens
  their decoder direction promotes through the unembedding ("logit lens").

Features shown: the ``--features`` given (the demo task's) plus the
``--auto`` features whose top activations are most concentrated on one token
string (the simplest evidence that a feature is real, not noise).

    python scripts/sae_card.py --sae sae_fast/assets/smollm2_sae \
        --corpus $SAE_FAST_CACHE/demo_corpus --windows 96
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

ASSETS = Path(__file__).resolve().parents[1] / "sae_fast" / "assets"
log = logging.getLogger("sae_card")
SKIP_POSITIONS = 4
SMALL = 16  # windows of the small sample the tests recompute
IDS_FILE = "card_heldout_ids.safetensors"


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_acts(model, ids: torch.Tensor, layer: int, batch: int = 16) -> torch.Tensor:
    """Residual stream after decoder layer ``layer`` (the sae-lens HF hook
    ``model.layers.{layer}``), [N, T, d]; stops the forward there."""
    from sae_fast.backends.common import decoder_layers

    out: list[torch.Tensor] = []

    def hook(_m, _a, o):
        out.append((o[0] if isinstance(o, tuple) else o).float())
        raise _Stop

    h = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        for i in range(0, ids.shape[0], batch):
            try:
                model(input_ids=ids[i:i + batch])
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(out)


def token_mask(ids: torch.Tensor, special: Sequence[int]) -> torch.Tensor:
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :SKIP_POSITIONS] = False
    for s in special:
        mask &= ids != s
    return mask


@torch.no_grad()
def card_stats(sae, acts: torch.Tensor, mask: torch.Tensor) -> dict:
    x = acts[mask]
    f = sae.encode(x)
    xh = sae.decode(f)
    resid = ((x - xh) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    fired = (f > 0).any(0)
    return {"tokens": int(x.shape[0]), "l0": float((f > 0).float().sum(-1).mean()),
            "explained_variance": float(1 - resid / total),
            "dead_fraction": float(1 - fired.float().mean()),
            "mse": float(((x - xh) ** 2).mean())}


def _ctx(tok, row: torch.Tensor, pos: int, left: int = 6) -> str:
    lo = max(SKIP_POSITIONS, pos - left)
    before = tok.decode(row[lo:pos].tolist())
    here = tok.decode(row[pos:pos + 1].tolist())
    return (before + "[[" + here + "]]").replace("\n", "\\n")


@torch.no_grad()
def describe(model, tok, sae, acts, ids, mask, features: Sequence[int], top: int = 8) -> list[dict]:
    fa = sae.encode(acts.reshape(-1, acts.shape[-1])).reshape(*acts.shape[:2], -1)
    fa = fa * mask.unsqueeze(-1)
    # logit lens of the decoder directions through the final norm and the unembedding
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from demo_task_research import logit_lens

    lens = logit_lens(model, sae, list(features))
    rows = []
    for j, i in enumerate(features):
        v = fa[..., i]
        vals, flat = v.reshape(-1).topk(top)
        ex = []
        for val, fl in zip(vals.tolist(), flat.tolist()):
            if val <= 0:
                break
            r, p = divmod(fl, v.shape[1])
            ex.append({"act": round(val, 2), "token": tok.decode([int(ids[r, p])]),
                       "context": _ctx(tok, ids[r], p)})
        promoted = [tok.decode([t]) for t in lens[j].topk(10).indices.tolist()]
        rows.append({"feature": int(i), "frequency": float((v[mask] > 0).float().mean()),
                     "max_act": float(v.max()), "top": ex, "promotes": promoted})
    return rows


@torch.no_grad()
def auto_features(tok, sae, acts, ids, mask, n: int, top: int = 20, min_fires: int = 20) -> list[int]:
    """Features whose top ``top`` activations fall most on one token string."""
    fa = sae.encode(acts[mask])
    toks = ids[mask]
    fires = (fa > 0).sum(0)
    vals, idx = fa.topk(top, dim=0)  # [top, d_sae]
    scored = []
    for j in torch.nonzero(fires >= min_fires).flatten().tolist():
        words = [tok.decode([int(toks[r])]).strip().lower() for r in idx[:, j].tolist()]
        word, c = collections.Counter(words).most_common(1)[0]
        if word and any(ch.isalnum() for ch in word):
            scored.append((c / top, int(fires[j]), j, word))
    scored.sort(reverse=True)
    out, seen = [], set()
    for purity, _, j, word in scored:
        if word in seen:
            continue
        seen.add(word)
        out.append(j)
        if len(out) == n:
            break
    return out


def compute_card(sae_dir: str, corpus: str, windows: int = 96, features: Sequence[int] = (),
                 n_auto: int = 4, model_dir: Optional[str] = None) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_fast.models import smollm2
    from sae_fast.sae import load_sae

    torch.manual_seed(0)
    sae = load_sae(sae_dir, dtype=torch.float32)
    info_path = Path(sae_dir) / "train_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    layer = int(info.get("layer", sae.hook_layer if sae.hook_layer is not None else 15))
    mdir = model_dir or str(smollm2())
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    held = datasets.load_from_disk(str(Path(corpus) / "heldout"))
    n = min(windows, len(held))
    ids = torch.tensor(held[:n]["input_ids"])
    acts = layer_acts(model, ids, layer)
    mask = token_mask(ids, sorted(set(tok.all_special_ids)))
    stats = card_stats(sae, acts, mask)
    # the same numbers on the first SMALL windows: a test recomputes them from the shipped ids
    small = card_stats(sae, acts[:SMALL], mask[:SMALL])
    auto = auto_features(tok, sae, acts, ids, mask, n_auto)
    feats = list(dict.fromkeys(list(features) + auto))
    return {"layer": layer, "hook_name": f"model.layers.{layer}", "d_in": sae.d_in,
            "d_sae": sae.d_sae, "k": sae.k, "architecture": sae.architecture,
            "heldout_windows": n, "train_info": info, "stats": stats,
            "small_sample": {"windows": SMALL, **small}, "_ids": ids,
            "features": describe(model, tok, sae, acts, ids, mask, feats),
            "demo_features": list(features)}


DEFAULT_TITLE = "Demo SAE for SmolLM2-135M-Instruct"
DEFAULT_USED_BY = "the demo task"


def render(card: dict) -> str:
    s, ti = card["stats"], card["train_info"]
    lines = [
        f"# {card.get('title', DEFAULT_TITLE)}",
        "",
        "Generated by `scripts/sae_card.py` (do not edit by hand).",
        "",
        "| | |", "|---|---|",
        f"| model | {ti.get('model', 'SmolLM2-135M-Instruct')} |",
        f"| hook | `{card['hook_name']}` (residual stream after decoder layer {card['layer']} of 30) |",
        f"| architecture | {card['architecture']}, d_in {card['d_in']}, d_sae {card['d_sae']}, k {card['k']} |",
        f"| corpus | {ti.get('corpus', '?')} |",
        f"| tokens seen in training | {ti.get('training_tokens', '?'):,} (context {ti.get('context_size', '?')}, positions >= 4, special tokens excluded) |",
        f"| training time | {ti.get('train_seconds', '?')} s on {ti.get('torch_threads', '?')} CPU threads |",
        f"| held-out sample | {s['tokens']:,} tokens ({card['heldout_windows']} windows, positions >= 4, special tokens excluded) |",
        f"| L0 | {s['l0']:.2f} |",
        f"| explained variance (held-out) | {s['explained_variance']:.3f} |",
        f"| dead features on held-out sample | {s['dead_fraction']:.1%} |",
        "",
        "## Features",
        "",
    ]
    demo = set(card.get("demo_features", []))
    for f in card["features"]:
        tag = f" (used by {card.get('used_by', DEFAULT_USED_BY)})" if f["feature"] in demo else ""
        lines += [f"### Feature {f['feature']}{tag}",
                  "",
                  f"fires on {f['frequency']:.2%} of held-out tokens; max activation {f['max_act']:.2f}; "
                  f"decoder direction promotes: {', '.join(repr(t) for t in f['promotes'])}",
                  "", "| activation | token | context |", "|---|---|---|"]
        for e in f["top"]:
            ctx = e["context"].replace("|", "\\|")
            lines.append(f"| {e['act']:.2f} | `{e['token']!r}` | `{ctx}` |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", default=str(ASSETS / "smollm2_sae"),
                   help="the SAE folder; the card is written beside it (default: the package data)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--windows", type=int, default=96)
    p.add_argument("--features", type=int, nargs="*", default=None,
                   help="features to describe (default: the demo task's, from demo_task.json)")
    p.add_argument("--auto", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--title", default=DEFAULT_TITLE, help="the card's heading")
    p.add_argument("--used-by", default=DEFAULT_USED_BY,
                   help="what uses the --features (shown beside each)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    feats = args.features
    task_file = Path(args.sae) / "demo_task.json"
    if feats is None:
        feats = json.loads(task_file.read_text())["features"] if task_file.is_file() else []
    card = compute_card(args.sae, args.corpus, args.windows, feats, args.auto)
    card["seconds"] = round(time.time() - t0, 1)
    card["title"], card["used_by"] = args.title, args.used_by
    out = Path(args.sae)
    from safetensors.torch import save_file

    save_file({"input_ids": card.pop("_ids").to(torch.int32).contiguous()}, str(out / IDS_FILE))
    (out / "card.json").write_text(json.dumps(card, indent=2))
    (out / "CARD.md").write_text(render(card) + "\n")
    log.info("card: %s", json.dumps(card["stats"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
