"""Model backends: hooks that apply steering plans inside an LLM's forward
(``hf`` for transformers, ``vllm`` for the vLLM engine)."""
