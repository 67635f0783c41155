"""Drop-in SAE steering for vLLM (the public face of ``sae_fast.backends.vllm``).

    from vllm import LLM, SamplingParams
    import sae_fast.vllm as sv

    llm = LLM(model=path, **sv.engine_args())          # steerable engine
    with sv.attach(llm, sae, layer=12, features=[3, 7], mode="set",
                   max_activations=[8.0, 8.0]) as steer:
        out = llm.generate(prompts, SamplingParams(max_tokens=32, extra_args={
            "sae": {"features": [3], "strengths": [2.0]}}))
        steer.disable(); steer.enable(); print(steer.stats())

Works with the in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and
the default multiprocess engine, in vLLM's default compiled mode and with
``enforce_eager=True``. See ``sae_fast.backends.vllm`` for the design.
"""

from sae_fast.backends.vllm import (  # noqa: F401
    EXTENSION_QUALNAME,
    SAESteeringWorkerExtension,
    SteeringRequestError,
    VLLMSteering,
    VLLMSteeringError,
    attach,
    detach_all,
    engine_args,
    generate,
    install,
    set_enabled,
    stats,
    steering_cache_salt,
    uninstall,
)

__all__ = ["attach", "engine_args", "install", "uninstall", "set_enabled", "stats", "detach_all",
           "generate", "steering_cache_salt", "VLLMSteering", "VLLMSteeringError",
           "SteeringRequestError", "SAESteeringWorkerExtension", "EXTENSION_QUALNAME"]


def register_plugin() -> None:
    """``vllm.general_plugins`` entry point: install the model-runner hook in
    every vLLM process (inert for engines that did not ask for steering)."""
    install()
