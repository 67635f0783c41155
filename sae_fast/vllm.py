"""Drop-in SAE steering for vLLM (the public face of ``sae_fast.backends.vllm_engine``).

Offline engine::

    from vllm import LLM, SamplingParams
    import sae_fast.vllm as sv

    llm = LLM(model=path, **sv.engine_args(layers=[12]))      # steerable engine
    with sv.attach(llm, sae, layer=12, features=[3, 7], mode="set",
                   max_activations=[8.0, 8.0]) as steer:
        out = llm.generate(prompts, SamplingParams(max_tokens=32, extra_args={
            "sae": {"features": [3], "strengths": [2.0]}}))
        steer.disable(); steer.enable(); print(steer.stats())

Async engine: ``await sv.attach_async(engine, sae, layer=12, ...)``; server:
``sae-fast serve MODEL --sae PATH --layer 12 --features 3 7`` or vLLM's server
with ``--worker-extension-cls`` and ``--additional-config`` (see the README).
"""

from sae_fast.backends.vllm_engine import (  # noqa: F401
    EXTENSION_QUALNAME,
    AsyncVLLMSteering,
    SAESteeringWorkerExtension,
    SteeringRequestError,
    VLLMSteering,
    VLLMSteeringError,
    attach,
    attach_async,
    detach_all,
    detach_async,
    engine_args,
    generate,
    install,
    set_enabled,
    set_enabled_async,
    stats,
    stats_async,
    steering_cache_salt,
    uninstall,
)

__all__ = ["attach", "attach_async", "engine_args", "set_enabled", "set_enabled_async", "stats",
           "stats_async", "detach_all", "detach_async", "generate", "steering_cache_salt",
           "VLLMSteering", "AsyncVLLMSteering", "VLLMSteeringError", "SteeringRequestError",
           "EXTENSION_QUALNAME"]


def register_plugin() -> None:
    """``vllm.general_plugins`` entry point: install the model-runner and
    admission hooks in every vLLM process (inert for engines that did not ask
    for steering), and make sae_fast's log lines visible there."""
    import logging

    pkg = logging.getLogger("sae_fast")
    if not any(not isinstance(h, logging.NullHandler) for h in pkg.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                               "%m-%d %H:%M:%S"))
        pkg.addHandler(handler)
        if pkg.level == logging.NOTSET:
            pkg.setLevel(logging.INFO)
    install()
