"""vLLM backend: per-request SAE steering inside the vLLM workers, in vLLM's
default compiled mode (torch.compile; CUDA graphs on GPU) as well as eagerly,
for the offline ``LLM``, ``AsyncLLM`` and the OpenAI server.

Modules, by what they hold:

``_compat``    every access to a private vLLM attribute, behind a version check
``config``     the ``additional_config["sae_fast"]`` block (pydantic)
``groups``     an attached SAE (``AttachedSAE``), request resolution, salts
``transport``  driver -> worker plan payloads (safetensors bytes)
``worker``     per-layer slots, the per-step token -> row map, the worker extension
``patch``      build-time patches: model-runner ``load_model``, decoder-layer ``forward``
``admission``  request validation and ``cache_salt`` in the serving process
``driver``     ``engine_args``, ``attach``/``attach_async`` and the controls
``serve``      ``sae-fast serve``: vLLM's OpenAI server with steering

How it works
------------
*Build time (every worker process).* ``install()`` (run by the
``vllm.general_plugins`` entry point and on import of this package) wraps the
model runners' ``load_model``. For an engine that opted in (our worker
extension, or the ``sae_fast`` block in ``additional_config``), the wrapper
runs after the model is built and *before* anything is compiled or captured:
it gives the chosen decoder layers a slot of persistent, fixed-size device
tensors, attaches the SAEs listed in the config, and patches the decoder
layer's class ``forward`` to call the registered op ``sae_fast::steer_`` on its
``(hidden_states, residual)`` output: it reads ``hidden + residual`` and
writes the delta into ``hidden`` only. Dynamo traces the patched forward, so
the op is part of the compiled graph; the tables are graph inputs edited in
place, never reallocated. Row 0 of every table is all-off, an exact no-op.

*Admission (serving process).* A class-level hook on vLLM's
``InputProcessor.assign_request_id`` validates every request of an opted-in
engine against its attached SAEs (bad steering: ``VLLMValidationError``,
HTTP 400) and sets the steering fingerprint as ``cache_salt``.

*Attach at run time.* ``attach`` / ``attach_async`` build a compact plan on
the host and send it with ``collective_rpc`` to every worker (every
tensor-parallel rank), which copies it into free columns of the layer slots.

*Every step (worker).* A wrapper around the runner's input preparation keeps
each steered request's validated rows, binds a table row to each scheduled
steered request (free, or reclaimed from a preempted one: with ``max_rows >=
max_num_seqs`` a scheduled steered request always has one) and writes the
token -> row map with one ``np.repeat`` + ``copy_``.
"""

from sae_fast.backends.common import AttachedSAE, resolve_request  # noqa: F401
from sae_fast.backends.vllm_engine._compat import VLLMSteeringError  # noqa: F401
from sae_fast.backends.vllm_engine.admission import SteeringRequestError  # noqa: F401
from sae_fast.backends.vllm_engine.config import CONFIG_KEY  # noqa: F401
from sae_fast.backends.vllm_engine.driver import (AsyncVLLMSteering, VLLMSteering, attach,  # noqa: F401
                                           attach_async, detach_all, detach_async,
                                           engine_args, generate, set_enabled,
                                           set_enabled_async, stats, stats_async,
                                           steering_cache_salt)
from sae_fast.backends.vllm_engine.patch import EXTENSION_QUALNAME, install, uninstall  # noqa: F401
from sae_fast.backends.vllm_engine.worker import LayerSlot, SAESteeringWorkerExtension  # noqa: F401
from sae_fast.request import REQUEST_KEY, request_entries  # noqa: F401

try:  # every process that resolves our worker extension imports this package
    install()
except Exception as _err:  # vLLM missing or incompatible: attach() will say so
    import logging

    logging.getLogger(__name__).debug("sae_fast: vLLM hooks not installed: %s", _err)
