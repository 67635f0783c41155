"""One HF decode step on a GPU with Llama-3-8B's shapes, unsteered vs steered.

    python benchmarks/bench_hf_gpu.py [--batches 1 64 256] [--json OUT.json]

A randomly initialised ``LlamaForCausalLM`` with Llama-3-8B's configuration
(hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336, vocab 128256) in
bf16, no weights needed. Per batch size B: a 128-token prompt batch is
prefilled once, then one decode forward (one new token per row, on that KV
cache, cropped back after every call so each call does the same work) is
timed with CUDA events; candidates interleaved round by round
(``harness.paired``; each candidate's hooks are installed untimed before
its batch of calls):

    unsteered  no steering attached (the baseline)
    steered    ``sae_fast.backends.hf.attach`` at layer 16, a random
               (4096 x 32768) SAE in bf16, k=8 features, set mode, every row
               steered: every pre-hook and hook of the backend runs
    full_sae   the usual forward hook at the same layer: encode all 32768
               features, edit 8, decode, keep the error term

``--tiny`` runs the same on a small random Llama (the CPU smoke run that
checks this script where no GPU is lent).

Run by ``benchmarks/gpu_check.sh`` (stage ``hf_decode``); needs transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_hf import full_sae_hook  # noqa: E402
from harness import machine_info, paired  # noqa: E402

LAYER, K, PROMPT = 16, 8, 128


SHAPES = {  # Llama-3-8B, and a tiny stand-in for a CPU smoke run (--tiny)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=20,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
}


def random_llama(shapes: str, device: str, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shapes], max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def decode_step(model, batch: int):
    """A function running one decode forward of ``batch`` rows on a fixed cache."""
    from transformers import DynamicCache

    dev = model.device
    g = torch.Generator(device=dev).manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device=dev, generator=g)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    pos = torch.full((batch, 1), PROMPT, device=dev)

    def step():
        with torch.no_grad():
            logits = model(input_ids=nxt, past_key_values=cache, position_ids=pos,
                           use_cache=True).logits
        cache.crop(-1)  # drop the token just added: every call sees PROMPT cached tokens
        return logits
    return step


def run(batches, rounds: int = 7, shapes: str = "llama3-8b") -> dict:
    from sae_fast.backends.common import decoder_layers
    from sae_fast.backends.hf import attach
    from sae_fast.sae import random_sae

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else None
    model = random_llama(shapes, device)
    d = model.config.hidden_size
    sae = random_sae(d, 8 * d, seed=0, dtype=torch.bfloat16).to(device)
    d_sae = 8 * d
    feats = list(range(0, d_sae, d_sae // K))[:K]
    layer_mod = decoder_layers(model)[LAYER]
    results = {"machine": {**machine_info(), "device": torch.cuda.get_device_name()
                           if device == "cuda" else "cpu"},
               "model": f"random Llama, {shapes} shapes, bf16", "layer": LAYER, "k": K,
               "d_sae": d_sae, "prompt": PROMPT, "groups": {}}
    for b in batches:
        step = decode_step(model, b)
        state = {"steerer": None, "hook": None}

        def use(mode, b=b):
            """Remove whatever steering is on, then install ``mode``'s (untimed)."""
            if state["steerer"] is not None:
                state["steerer"].remove()
            if state["hook"] is not None:
                state["hook"].remove()
            state.update(steerer=None, hook=None)
            if mode == "steered":
                st = attach(model, sae, layer=LAYER, features=feats, mode="set",
                            max_activations=[4.0] * K, max_batch=b)
                st.set_strengths([[1.0] * K] * b)
                state["steerer"] = st
            elif mode == "full_sae":
                state["hook"] = layer_mod.register_forward_hook(full_sae_hook(sae, feats, 4.0))

        modes = ("unsteered", "steered", "full_sae")
        out = {}
        for m in modes:
            use(m)
            out[m] = step()
        assert not torch.equal(out["unsteered"], out["steered"]), "steering changed nothing"
        assert not torch.equal(out["unsteered"], out["full_sae"]), "the full-SAE hook changed nothing"
        res = paired({m: step for m in modes}, "unsteered", rounds=rounds, inner=5,
                     sync=sync,
                     before={m: (lambda m=m: use(m)) for m in modes})
        results["groups"][f"hf decode step B={b}"] = res
        use("unsteered")
        del step
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny model shapes, on the CPU when no GPU is present (a smoke run)")
    a = ap.parse_args()
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("bench_hf_gpu.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    res = run(a.batches, a.rounds, "tiny" if a.tiny else "llama3-8b")
    print("| group | unsteered ms | steered ms (ratio) | full-SAE hook ms (ratio) |\n"
          "|---|---:|---:|---:|")
    for g, r in res["groups"].items():
        c = r["candidates"]
        print(f"| {g} | {c['unsteered']['median_s'] * 1e3:.2f} | "
              f"{c['steered']['median_s'] * 1e3:.2f} ({c['steered']['ratio']:.3f}x) | "
              f"{c['full_sae']['median_s'] * 1e3:.2f} ({c['full_sae']['ratio']:.3f}x) |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
