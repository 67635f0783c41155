"""Research: is there a sentiment feature in a SmolLM2 SAE (default: the shipped one)?

1. Contrast sentences built from VADER's own lexicon (vaderSentiment ships
   it): "It was a <word> day." for the most positive and most negative
   single words. The SAE's features at the steered layer are ranked by their
   mean activation on the positive sentences minus the negative ones (at the
   word and the tokens after it). With ``--corpus`` (a folder written by
   ``scripts/build_sentiment_corpus.py``) the contrast is the corpus's own
   answers instead: those written in a positive tone against those in a
   negative one, over every answer token.
2. The top candidates are probed by steering: neutral prompts generated
   greedily at strengths 0 and +-S, scored by VADER's compound score
   (a scorer no one here wrote) and by fluency under the unsteered model.

    python scripts/find_sentiment_feature.py [--top 8] [--strengths -40 -20 20 40]
    python scripts/find_sentiment_feature.py --sae DIR --corpus DIR   # another SAE
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_task_research as research  # noqa: E402

NEUTRAL = ["Describe a kitchen.", "Write two sentences about a train station.",
           "Tell me about a Tuesday morning.", "Describe the weather today.",
           "Write a short note about a meeting at work.", "Describe a city street.",
           "Tell me about your neighbour's garden.", "Write about a long bus ride.",
           "Describe an old chair.", "Write two sentences about a library.",
           "Describe a trip to the supermarket.", "Tell me about a rainy afternoon."]


def lexicon_words(n: int) -> tuple[list[str], list[str]]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lex = SentimentIntensityAnalyzer().lexicon
    words = [(w, v) for w, v in lex.items() if w.isalpha() and len(w) > 3]
    words.sort(key=lambda x: x[1])
    return [w for w, _ in words[-n:]], [w for w, _ in words[:n]]


def corpus_texts(corpus: str, n: int) -> tuple[list[str], list[str]]:
    """Up to ``n`` answers per side from a sentiment corpus's ``texts.jsonl``, split by the
    tone their prompt asked for (``build_sentiment_corpus.POSITIVE`` / ``NEGATIVE``)."""
    import build_sentiment_corpus as bsc

    pos, neg = [], []
    for line in open(Path(corpus) / "texts.jsonl"):
        row = json.loads(line)
        tone = bsc.tone_of(row["prompt"])
        side = pos if tone in bsc.POSITIVE else neg if tone in bsc.NEGATIVE else None
        if side is not None and len(side) < n:
            side.append(row["text"].split("\n", 1)[-1])  # the answer, without the request
    return pos, neg


def main(argv=None) -> int:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from sae_fast.generate import format_prompts, load_hf
    from sae_fast.sae import load_sae
    from sae_fast.train.demo_task import load_demo_task

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--words", type=int, default=80)
    p.add_argument("--strengths", type=float, nargs="+", default=[-40.0, -20.0, 20.0, 40.0])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--features", type=int, nargs="*", help="probe these instead of ranking")
    p.add_argument("--sae", default=None, help="SAE folder (default: the shipped demo SAE)")
    p.add_argument("--layer", type=int, default=None, help="steered layer (default: the demo's)")
    p.add_argument("--corpus", default=None,
                   help="rank by positive- vs negative-tone answers of this sentiment corpus")
    p.add_argument("--corpus-texts", type=int, default=256, help="answers per side")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_demo_task()
    model, tok = load_hf(task.model_path)
    sae = load_sae(args.sae or task.sae_path)
    layer = task.layer if args.layer is None else args.layer
    t0 = time.perf_counter()
    if not args.features:
        if args.corpus:
            sides = dict(zip(("pos", "neg"), corpus_texts(args.corpus, args.corpus_texts)))
            window = slice(4, None)  # every answer token past the first few
        else:
            words = lexicon_words(args.words)
            # the last 6 real tokens: the word and what follows it
            sides = {name: [f"It was a {w} day, and everyone felt it." for w in ws]
                     for name, ws in zip(("pos", "neg"), words)}
            window = slice(-6, None)
        acts = {name: research.mean_feature_activations(model, tok, sae, layer, texts,
                                                        window)
                for name, texts in sides.items()}
        diff = acts["pos"] - acts["neg"]
        order = torch.argsort(diff.abs(), descending=True)[:args.top].tolist()
        print("candidates (mean act on positive - negative):")
        for f in order:
            print(f"  feature {f:5d}: pos {acts['pos'][f]:.3f} neg {acts['neg'][f]:.3f} "
                  f"diff {diff[f]:+.3f}")
        cands = [(f, 1.0 if diff[f] > 0 else -1.0) for f in order]
    else:
        cands = [(f, 1.0) for f in args.features]
    vader = SentimentIntensityAnalyzer()
    prompts = format_prompts(tok, NEUTRAL, chat=True)

    def compound(text: str) -> float:
        return vader.polarity_scores(text)["compound"]

    for f, sign in cands:
        rows = research.sweep_feature(model, tok, sae, layer, f, prompts,
                                      [sign * s for s in args.strengths], compound,
                                      args.max_new_tokens)
        line = [f"feature {f} (sign {sign:+.0f}):"] + [
            f"s={s:+.0f}: vader {c:+.3f} fl {fl:.2f} rep {rep:.2f}" for s, c, fl, rep, _ in rows]
        print("  ".join(line), f"({time.perf_counter() - t0:.0f} s)")
        print("     +:", rows[-1][4][0].text[:160].replace("\n", " "))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
