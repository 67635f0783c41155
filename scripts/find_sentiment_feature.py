"""Research: is there a sentiment feature in the shipped SmolLM2 SAE?

1. Contrast sentences built from VADER's own lexicon (vaderSentiment ships
   it): "It was a <word> day." for the most positive and most negative
   single words. The SAE's features at the steered layer are ranked by their
   mean activation on the positive sentences minus the negative ones (at the
   word and the tokens after it).
2. The top candidates are probed by steering: neutral prompts generated
   greedily at strengths 0 and +-S, scored by VADER's compound score
   (a scorer no one here wrote) and by fluency under the unsteered model.

    python scripts/find_sentiment_feature.py [--top 8] [--strength 20]
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_demo_task()
    model, tok = load_hf(task.model_path)
    sae = load_sae(task.sae_path)
    layer = task.layer
    t0 = time.perf_counter()
    if not args.features:
        pos, neg = lexicon_words(args.words)
        # the last 6 real tokens: the word and what follows it
        acts = {name: research.mean_feature_activations(
            model, tok, sae, layer, [f"It was a {w} day, and everyone felt it." for w in words],
            slice(-6, None)) for name, words in (("pos", pos), ("neg", neg))}
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
