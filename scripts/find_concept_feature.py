"""Research: which feature of the shipped SmolLM2 SAE steers a topic concept fluently?

1. Contrast sentences: "I saw the <word> one over there." for the concept's
   words against the same sentence with everyday neutral words. The SAE's
   features at the demo layer are ranked by mean activation (the word and the
   tokens after it) on the concept sentences minus the neutral ones.
2. The top candidates are probed by steering: neutral prompts generated
   greedily at strengths 0 and +-S, scored by the share of generated words in
   the concept's lexicon, by fluency (NLL under the unsteered model minus that
   of the unsteered completion) and by repeated bigrams.

    python scripts/find_concept_feature.py --concept colour [--top 6]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_task_research as research  # noqa: E402

CONCEPTS = {
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black",
               "white", "grey", "gray", "golden", "silver", "violet", "crimson", "turquoise",
               "scarlet", "colour", "color", "colours", "colors", "colorful", "colourful",
               "bright", "blues", "reds", "greens"],
    "food": ["bread", "cheese", "soup", "apple", "cake", "pasta", "rice", "chicken", "salad",
             "pizza", "chocolate", "coffee", "tea", "butter", "fruit", "meal", "dinner",
             "breakfast", "lunch", "delicious", "tasty", "food", "eat", "eating", "cook"],
    "animal": ["dog", "cat", "bird", "horse", "fish", "cow", "lion", "tiger", "rabbit", "mouse",
               "bear", "wolf", "sheep", "duck", "animal", "animals", "dogs", "cats", "birds",
               "puppy", "kitten"],
    "water": ["water", "sea", "ocean", "river", "lake", "rain", "wave", "waves", "swim",
              "beach", "boat", "wet", "flood", "stream", "waterfall", "splash", "shore"],
    "music": ["music", "song", "songs", "sing", "singing", "guitar", "piano", "drum", "melody",
              "band", "concert", "dance", "rhythm", "violin", "tune", "choir"],
    "digits": ["<digits>", "1", "2", "3", "5", "7", "10", "12", "20", "25", "50", "100", "365",
               "2024", "1999", "42", "8", "9", "15", "30"],
    "number": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
               "hundred", "thousand", "dozen", "first", "second", "third", "number", "numbers"],
}
NEUTRAL_WORDS = ["new", "old", "big", "small", "other", "same", "last", "next", "main", "usual",
                 "whole", "nearby", "second", "left", "right", "empty", "plain", "quiet"]
PROMPTS = ["Describe a kitchen.", "Write two sentences about a train station.",
           "Tell me about a Tuesday morning.", "Describe an office meeting.",
           "Write a short note about a bus ride.", "Describe a city street.",
           "Tell me about a library.", "Describe an old chair.",
           "Write two sentences about a staircase.", "Describe a trip to the supermarket.",
           "Tell me about a parking lot.", "Describe a calendar."]


def concept_share(text: str, words: set[str]) -> float:
    """Share of the text's words in ``words`` (with the "digits" concept: that are numerals)."""
    toks = re.findall(r"[a-z]+|\d+", text.lower())
    if "<digits>" in words:
        return sum(t.isdigit() for t in toks) / max(1, len(toks))
    return sum(t in words for t in toks) / max(1, len(toks))


def main(argv=None) -> int:
    from sae_fast.generate import format_prompts, load_hf
    from sae_fast.sae import load_sae
    from sae_fast.train.demo_task import load_demo_task

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", choices=sorted(CONCEPTS), default="colour")
    p.add_argument("--top", type=int, default=6)
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
    words = CONCEPTS[args.concept]
    t0 = time.perf_counter()
    if not args.features:
        # the word and the four tokens after it (the sentence ends in 5 more)
        acts = {name: research.mean_feature_activations(
            model, tok, sae, layer, [f"I saw the {w} one over there, next to the door." for w in ws],
            slice(-10, -5)) for name, ws in (("concept", words), ("neutral", NEUTRAL_WORDS))}
        diff = acts["concept"] - acts["neutral"]
        order = torch.argsort(diff, descending=True)[:args.top].tolist()
        print(f"candidates for {args.concept} (mean act on concept - neutral sentences):")
        for f in order:
            print(f"  feature {f:5d}: concept {acts['concept'][f]:.3f} neutral "
                  f"{acts['neutral'][f]:.3f} diff {diff[f]:+.3f}")
        cands = order
    else:
        cands = list(args.features)
    lex = set(words)
    prompts = format_prompts(tok, PROMPTS, chat=True)
    for f in cands:
        rows = research.sweep_feature(model, tok, sae, layer, f, prompts, args.strengths,
                                      lambda text: concept_share(text, lex), args.max_new_tokens)
        line = [f"feature {f}:"] + [f"s={s:+.0f}: share {c:.3f} fl {fl:+.2f} rep {rep:.2f}"
                                    for s, c, fl, rep, _ in rows]
        print("  ".join(line), f"({time.perf_counter() - t0:.0f} s)")
        positive = [r for r in rows if r[0] > 0]
        if positive:
            print("     +:", positive[-1][4][0].text[:160].replace("\n", " "))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
