"""Pick the demo feature by evidence and write the demo task files.

Writes ``<sae>/demo_task.json`` (feature, layer, strength, word, reward token
sets and the evidence behind them) and ``<data-dir>/demo_{train,val}.jsonl``;
by default into the package data, ``sae_fast/assets/smollm2_sae`` and
``sae_fast/assets/demo_data``. See ``sae_fast/train/demo_task.py`` for the task,
``scripts/demo_task_research.py`` for the candidate ranking and the questions,
and ``sae_fast/train/probe.py`` for the steering probe.

    python scripts/make_demo_task.py --corpus $SAE_FAST_CACHE/demo_corpus
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_task_research as research  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "sae_fast" / "assets"
log = logging.getLogger("make_demo_task")


class _Stop(Exception):
    pass


@torch.no_grad()
def heldout_acts(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    from sae_fast.backends.common import decoder_layers

    out = []

    def hook(_m, _a, o):
        out.append((o[0] if isinstance(o, tuple) else o).float())
        raise _Stop

    h = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        for i in range(0, ids.shape[0], 16):
            try:
                model(input_ids=ids[i:i + 16])
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(out)[:, 4:].reshape(-1, out[0].shape[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", default=str(ASSETS / "smollm2_sae"))
    p.add_argument("--corpus", required=True)
    p.add_argument("--data-dir", default=str(ASSETS / "demo_data"))
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--candidates", type=int, default=6)
    p.add_argument("--alpha", type=float, default=0.5,
                   help="steering norm as a fraction of the median residual norm")
    p.add_argument("--words-only", action=argparse.BooleanOptionalAction, default=True,
                   help="reward token sets hold whole-word tokens only (no punctuation/newlines)")
    p.add_argument("--top", type=int, default=12, help="tokens per reward set")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (2 spinning threads on a shared 2-core machine are far slower)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    t0 = time.time()

    import datasets

    from sae_fast.generate import load_hf
    from sae_fast.models import smollm2
    from sae_fast.sae import load_sae
    from sae_fast.train.demo_task import TASK_FILE
    from sae_fast.train.probe import WHOLE_WORD, probe_feature

    model, tok = load_hf(str(smollm2()))
    sae = load_sae(args.sae, dtype=torch.float32)
    info = json.loads((Path(args.sae) / "train_info.json").read_text())
    layer = int(info["layer"])
    held = datasets.load_from_disk(str(Path(args.corpus) / "heldout"))
    ids = torch.tensor(held[:args.windows]["input_ids"])
    acts = heldout_acts(model, ids, layer)
    scale = research.residual_scale(acts)
    fa = sae.encode(acts)
    cands = research.candidate_features(model, tok, sae, fa, n=args.candidates)
    log.info("median residual norm %.2f; candidates %s", scale,
             [(c["feature"], c["promotes"][:4]) for c in cands])

    def chat(q: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)

    rng = random.Random(args.seed + 7)
    probe_prompts = [chat(research.PROBE_TEMPLATE.format(topic=t))
                     for t in rng.sample(research.TOPICS, 12)]
    probes = []
    for c in cands:
        s = args.alpha * scale / float(sae.W_dec[c["feature"]].float().norm())
        r = probe_feature(model, tok, sae, c["feature"], layer, s, probe_prompts, seed=args.seed,
                          words_only=args.words_only, top=args.top)
        r["candidate"] = c
        probes.append(r)
        log.info("feature %d S=%.1f effect %.3f up %s down %s", c["feature"], s, r["effect"],
                 r["up_tokens"], r["down_tokens"])
    best = max(probes, key=lambda r: r["effect"])
    feature, strength = best["feature"], best["strength"]
    # the word the questions name: the feature's top whole word through the
    # unembedding, else the first whole word its steering made more frequent
    word = next((w.strip() for w in best["candidate"]["promotes"] + best["up_tokens"]
                 if WHOLE_WORD.match(w)), best["up_tokens"][0].strip())
    # final reward token sets: probe again on task-style questions (both types)
    task_prompts = [chat(q["prompt"]) for q in research.make_questions(16, args.seed + 99, word)]
    final = probe_feature(model, tok, sae, feature, layer, strength, task_prompts,
                          seed=args.seed + 1, words_only=args.words_only, top=args.top)
    spec = {"feature": feature, "layer": layer, "strength": round(strength, 3), "word": word,
            "features": [feature],
            "token_sets": {"up": final["up"], "down": final["down"]},
            "evidence": {"median_residual_norm": scale, "alpha": args.alpha,
                         "selection_probes": probes, "final_probe": final,
                         "rule": "max over candidates of the generated-token mass moved by "
                                 "steering (+S vs -S), see scripts/make_demo_task.py"}}
    (Path(args.sae) / TASK_FILE).write_text(json.dumps(spec, indent=2))
    out = Path(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", args.n_train, args.seed), ("val", args.n_val, args.seed + 1)):
        rows = research.make_questions(n, seed, word)
        (out / f"demo_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log.info("feature %d (word %r, S=%.2f) up %s down %s; %.0f s", feature, word, strength,
             final["up_tokens"], final["down_tokens"], time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
