"""Write the sentiment task's question files (examples/sentiment/{train,val}.jsonl).

The second task, held out from the demo's design: steer SmolLM2-135M-Instruct
towards the tone each question asks for with feature 384 of the sentiment SAE
(``builtin:smollm2_sentiment_sae``, a negativity feature found by
``scripts/find_sentiment_feature.py --corpus``), scored by VADER's compound score (``reward.name: vader``, the
vaderSentiment package; no one here wrote the scorer).

Each question asks for a tone, "cheerful" (ground_truth "positive") or
"gloomy" ("negative"), about a topic from one of three tiers: happy, neutral
or sad. The right strength depends on both: a cheerful take on a happy topic
needs little push, on a sad topic a strong push down the negativity feature;
a gloomy take on a happy topic needs a strong push up, on a sad topic little.
data_source is ``<tone>_<tier>``. Train and validation use disjoint topics
(12 and 16 per tier), with the same four templates per tone:
288 training and 384 validation questions. Validation has more topics than
training because it is what the methods' 95% intervals are computed over:
with 192 questions (8 topics per tier, the first design) the best
constant's interval was +-0.08 wide, as wide as the whole gap an oracle
per question type could open.

    python scripts/make_sentiment_task.py [--out examples/sentiment]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEMPLATES = {"positive": ["Describe {t} in a cheerful way.",
                         "Write two happy, upbeat sentences about {t}.",
                         "Tell me something joyful about {t}.",
                         "Write a short, optimistic note about {t}."],
             "negative": ["Describe {t} in a gloomy way.",
                          "Write two sad, bleak sentences about {t}.",
                          "Tell me something miserable about {t}.",
                          "Write a short, pessimistic note about {t}."]}
TONE = {"positive": "cheerful", "negative": "gloomy"}
TOPICS = {
    "happy": ["your favourite holiday", "a surprise birthday party", "a puppy playing in the park",
              "winning a prize", "a sunny day at the beach", "a wedding", "meeting an old friend",
              "a delicious meal", "a baby's first steps", "a family picnic", "a big hug",
              "a summer festival",
              "graduation day", "a beautiful sunrise", "a kind stranger",
              "a garden in full bloom", "a rainbow after the rain", "a fun road trip",
              "a cozy evening by the fire", "a good friend's laughter",
              "a christmas morning", "a lottery win", "a warm bath", "a day at the fair",
              "a surprise gift", "an ice cream on a hot day", "a holiday by the sea",
              "a dance party"],
    "neutral": ["a kitchen", "a train station", "a Tuesday morning", "a city street",
                "an office meeting", "a bus ride", "a library", "an old chair",
                "a filing cabinet", "a spreadsheet", "a lamp post", "a bicycle lane",
                "a trip to the supermarket", "a parking lot", "a staircase", "a calendar",
                "a cardboard box", "a hallway", "a laundry basket", "a street map",
                "a stapler", "a car park ticket machine", "a drawer", "a photocopier",
                "a windowsill", "a door handle", "a water bottle", "a post office"],
    "sad": ["a car accident", "losing your job", "a funeral", "a flooded house",
            "a terrible toothache", "being stuck in traffic for hours", "failing an exam",
            "a broken leg", "a lonely hospital stay", "a forest fire", "a lost wallet",
            "a cancelled holiday",
            "a burglary at home", "a war", "a painful breakup", "a sick pet",
            "an earthquake", "a bankrupt company", "a missed flight", "a rainy, lonely birthday",
            "a house fire", "a stolen bicycle", "a hurricane", "a famine",
            "a lost child", "a shipwrecked sailor", "a drought", "an empty, cold flat"],
}
N_TRAIN_TOPICS = 12  # the first twelve topics of each tier; validation takes the rest (16)


def rows(split: str) -> list[dict]:
    out = []
    for tone, templates in TEMPLATES.items():
        for tier, topics in TOPICS.items():
            chosen = topics[:N_TRAIN_TOPICS] if split == "train" else topics[N_TRAIN_TOPICS:]
            for t in chosen:
                for tmpl in templates:
                    out.append({"prompt": tmpl.format(t=t), "ground_truth": tone,
                                "data_source": f"{TONE[tone]}_{tier}"})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "examples" / "sentiment"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        data = rows(split)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{out / (split + '.jsonl')}: {len(data)} questions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
