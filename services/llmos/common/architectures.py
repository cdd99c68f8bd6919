"""Which models the engine serves, and by which of its two forward paths, from config.json alone.

"llmos": the lean forward written for the Llama family (`engine/llama.py`), taken when the config
says nothing it does not implement. "transformers": the model's own transformers code over
llmos's attention and cache (`engine/generic.py`), for every other causal LM. Refused: what a
decoder-only engine cannot run (encoder-only and encoder-decoder models), and remote code.
"""

from __future__ import annotations

from typing import Any

from .errors import FailedPrecondition

LEAN = "llmos"
GENERIC = "transformers"
IMPLEMENTATIONS = ("auto", LEAN, GENERIC)
LEAN_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
# How transformers names its causal LM heads (GPT2LMHeadModel, OPTForCausalLM, ...).
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def architecture_of(config: dict[str, Any]) -> str:
    return (config.get("architectures") or ["unknown"])[0]


def check_servable(config: dict[str, Any]) -> None:
    """Refuses, with the reason, a config.json the engine cannot serve on either path."""
    architecture = architecture_of(config)
    if config.get("auto_map"):
        raise FailedPrecondition(
            f"{architecture} needs the model's own Python code (auto_map in config.json), which llmos "
            "does not run", reason="REMOTE_CODE_REFUSED", metadata={"architecture": architecture})
    if config.get("is_encoder_decoder") or not architecture.endswith(_CAUSAL_SUFFIXES):
        raise FailedPrecondition(
            f"{architecture} is not a decoder-only causal language model (encoder-only and "
            "encoder-decoder models are not served)", reason="NOT_A_CAUSAL_LM",
            metadata={"architecture": architecture})


def implementation(config: dict[str, Any]) -> str:
    """The forward path a servable config takes by default."""
    if architecture_of(config) not in LEAN_ARCHITECTURES:
        return GENERIC
    window = config.get("sliding_window")
    # Qwen2 carries a window it does not use unless use_sliding_window is set.
    sliding = window is not None and (architecture_of(config) != "Qwen2ForCausalLM"
                                      or config.get("use_sliding_window", False))
    if sliding and window < int(config.get("max_position_embeddings", 0)):
        return GENERIC     # the lean path has no sliding window
    if config.get("mlp_bias") or (config.get("attention_bias") and architecture_of(config) != "Qwen2ForCausalLM"):
        return GENERIC     # nor the biases of Llama's MLP and output projection
    return LEAN
