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


# What a catalog entry serves: text generation, or one of the pooling tasks (a forward over the
# input and no generation): embeddings, sequence classification, and scores of text pairs.
GENERATE, EMBED, CLASSIFY, SCORE = "generate", "embed", "classify", "score"
TASKS = (GENERATE, EMBED, CLASSIFY, SCORE)
POOLING_TASKS = (EMBED, CLASSIFY, SCORE)
# Encoders served for pooling tasks (transformers' AutoModel / AutoModelForSequenceClassification).
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "modernbert", "distilbert", "electra"})


def is_causal(config: dict[str, Any]) -> bool:
    return not config.get("is_encoder_decoder") and architecture_of(config).endswith(_CAUSAL_SUFFIXES)


def default_task(config: dict[str, Any], sentence_transformers: bool = False) -> str:
    """The task a model's files say it is for: a sequence classifier classifies (or scores pairs,
    with one label: a cross-encoder); a causal LM generates unless sentence-transformers' files
    make it an embedder; any other encoder embeds."""
    architecture = architecture_of(config)
    if architecture.endswith("ForSequenceClassification"):
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        return SCORE if labels == 1 else CLASSIFY
    if is_causal(config):
        return EMBED if sentence_transformers else GENERATE
    return EMBED


def check_servable(config: dict[str, Any], task: str = GENERATE) -> None:
    """Refuses, with the reason, a config.json llmos cannot serve for `task`."""
    architecture = architecture_of(config)
    if config.get("auto_map"):
        raise FailedPrecondition(
            f"{architecture} needs the model's own Python code (auto_map in config.json), which llmos "
            "does not run", reason="REMOTE_CODE_REFUSED", metadata={"architecture": architecture})
    if task == GENERATE and not is_causal(config):
        raise FailedPrecondition(
            f"{architecture} is not a decoder-only causal language model (encoder-only and "
            "encoder-decoder models are served for embed, classify and score only)", reason="NOT_A_CAUSAL_LM",
            metadata={"architecture": architecture})
    if task in POOLING_TASKS and not is_causal(config) and (
            config.get("is_encoder_decoder") or config.get("model_type") not in ENCODER_TYPES):
        raise FailedPrecondition(
            f"{architecture} ({config.get('model_type')}) is not an encoder llmos serves (one of "
            f"{', '.join(sorted(ENCODER_TYPES))}) nor a causal LM", reason="ARCHITECTURE_NOT_SUPPORTED",
            metadata={"architecture": architecture})
    if task in (CLASSIFY, SCORE) and not architecture.endswith("ForSequenceClassification"):
        raise FailedPrecondition(
            f"{architecture} has no classification head, so it cannot {task}", reason="MODEL_TASK_UNSUPPORTED",
            metadata={"architecture": architecture, "task": task})


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
