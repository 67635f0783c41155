"""Model backends: hooks that apply steering plans inside an LLM's forward
(``hf`` for transformers, ``vllm_engine`` for the vLLM engine, whose public
face is ``sae_fast.vllm``), and ``common``, what both share."""

from __future__ import annotations

import inspect
from typing import Any


def attach(model: Any, sae: Any, **kwargs: Any) -> Any:
    """Attach ``sae`` to ``model``, dispatching on what ``model`` is:

    * a transformers model (any ``torch.nn.Module``): ``sae_fast.backends.hf.attach``,
      returns an ``HFSteerer``;
    * a vLLM offline ``LLM``: ``sae_fast.vllm.attach``, returns a ``VLLMSteering``.

    An ``AsyncLLM`` (or any engine client with an async ``collective_rpc``)
    needs ``await sae_fast.vllm.attach_async(engine, ...)``. The keywords are
    the shared attach vocabulary (``sae_fast.backends.common.ATTACH_KEYWORDS``)
    plus the backend's own."""
    from torch import nn

    if isinstance(model, nn.Module):
        from sae_fast.backends.hf import attach as hf_attach

        return hf_attach(model, sae, **kwargs)
    rpc = getattr(model, "collective_rpc", None)
    if rpc is not None and inspect.iscoroutinefunction(rpc):
        raise TypeError(f"{type(model).__name__} is an async vLLM engine: use "
                        "`await sae_fast.vllm.attach_async(engine, sae, ...)`")
    if rpc is not None or hasattr(model, "llm_engine"):
        from sae_fast.backends.vllm_engine import attach as vllm_attach

        return vllm_attach(model, sae, **kwargs)
    raise TypeError(f"cannot attach an SAE to a {type(model).__module__}.{type(model).__name__}: "
                    "expected a transformers model (torch.nn.Module) or a vLLM LLM "
                    "(vllm.LLM created with sae_fast.vllm.engine_args(...))")
