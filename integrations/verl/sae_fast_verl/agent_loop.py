"""verl agent loop that steers each sample with its own strengths.

Each row of the batch carries (``non_tensor_batch`` columns, set by the
trainer for every sample, n per question for GRPO):

    raw_prompt      the chat messages (verl requires it)
    sae_prompt      the prompt text as sae_fast formats it (chat template applied);
                    tokenised here as is, so verl and sae_fast see the same tokens
    sae_strengths   the sampled strengths (effective) or None = unsteered
    sae_log_prob    the policy's log-prob of that action (returned untouched)
    sae_seed        per-sample sampling seed (reproducible rollouts) or None

The strengths go to the rollout server in ``sampling_params["extra_args"]``
(``{"sae": {"strengths": [...]}}``), where sae_fast's request admission
validates and salts them and the worker steers that request only. verl
replaces request ids, so nothing is keyed by id. The action, its log-prob and
what was requested come back in ``extra_fields`` (-> ``non_tensor_batch``).
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register

AGENT_NAME = "sae_steering"


def _as_list(v: Any) -> Any:
    if v is None:
        return None
    if hasattr(v, "tolist"):
        v = v.tolist()
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


@register(AGENT_NAME)
class SAESteeringAgentLoop(AgentLoopBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.response_length = int(self.rollout_config.response_length)

    def _prompt_ids(self, kwargs: dict) -> list[int]:
        text = kwargs.get("sae_prompt")
        if text is None:  # a plain verl row: verl's own chat-template path
            return self.tokenizer.apply_chat_template(list(kwargs["raw_prompt"]),
                                                      add_generation_prompt=True, tokenize=True)
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and str(text).startswith(bos))
        return self.tokenizer.encode(str(text), add_special_tokens=add_special)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        prompt_ids = self._prompt_ids(kwargs)
        params = dict(sampling_params)
        strengths = _as_list(kwargs.get("sae_strengths"))
        if strengths is not None:
            extra = dict(params.get("extra_args") or {})
            extra["sae"] = {"strengths": strengths}
            params["extra_args"] = extra
        seed = kwargs.get("sae_seed")
        if seed is not None:
            params["seed"] = int(seed)
        params["max_tokens"] = self.response_length
        out = await self.server_manager.generate(request_id=uuid4().hex, prompt_ids=prompt_ids,
                                                 sampling_params=params)
        response = list(out.token_ids)[: self.response_length]
        extra_fields = dict(out.extra_fields or {})
        extra_fields.update({
            "sae_strengths": strengths,
            "sae_log_prob": kwargs.get("sae_log_prob"),
            "sae_steered": strengths is not None,
            "sae_stop_reason": out.stop_reason,
            "turn_scores": [], "tool_rewards": [],
        })
        return AgentLoopOutput(prompt_ids=list(prompt_ids), response_ids=response,
                               response_mask=[1] * len(response), num_turns=2, metrics={},
                               extra_fields=extra_fields)
