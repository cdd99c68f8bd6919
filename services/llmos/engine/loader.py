"""Loads a model directory from the model store onto a device."""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmos.common import architectures
from llmos.common.devices import cpu_has_bf16
from llmos.common.errors import FailedPrecondition, InvalidArgument, NotFound

from .attention import BLOCK
from .engine import Runner
from .generic import GenericRunner, Unsupported
from .llama import LlamaRunner
from .memory import fitted_kv_tokens, kv_bytes_per_token
from .prompts import special_strings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    runner: Runner
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    measured_bytes: int
    # Longest sequence (prompt + output) the engine runs.
    max_seq_len: int
    eos_ids: frozenset[int]
    # The weight variant it runs ("" as stored, "int8").
    quantization: str = ""

    @functools.cached_property
    def special_strings(self) -> list[str]:
        """The text of its tokenizer's special tokens, which message contents keep as text."""
        return special_strings(self.tokenizer)

    @property
    def compiled(self) -> bool:
        """Whether decoding sequences attend through the compiled kernel."""
        return self.runner.cache.kernel is not None

    @property
    def implementation(self) -> str:
        """The forward path it runs: "llmos" (the lean Llama-family forward) or "transformers"."""
        return self.runner.implementation

    @property
    def dtype_name(self) -> str:
        """"bfloat16", "float32", ..."""
        return str(self.dtype).removeprefix("torch.")


def pick_device(preference: str) -> torch.device:
    """"auto" picks CUDA when present, else the CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def pick_dtype(preference: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on CUDA and on CPUs with native bf16, float32 otherwise."""
    if preference != "auto":
        return getattr(torch, preference)
    if device.type == "cuda" or cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _implementation(config: dict, requested: str) -> str:
    """The forward path for a model of `config`: as `requested`, or by its config for "auto"."""
    architectures.check_servable(config)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architecture = architectures.architecture_of(config)
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FailedPrecondition(f"transformers has no causal language model of type {config.get('model_type')!r} "
                                 f"({architecture})", reason="ARCHITECTURE_NOT_SUPPORTED",
                                 metadata={"architecture": architecture})
    if requested not in architectures.IMPLEMENTATIONS:
        raise InvalidArgument(f"unknown implementation {requested!r} "
                              f"(one of {', '.join(architectures.IMPLEMENTATIONS)})")
    if requested == "auto":
        return architectures.implementation(config)
    if requested == architectures.LEAN and architecture not in architectures.LEAN_ARCHITECTURES:
        raise FailedPrecondition(f"the lean forward does not run {architecture}", reason="ARCHITECTURE_NOT_SUPPORTED",
                                 metadata={"architecture": architecture})
    return requested


def load_model(name: str, path: str, device: torch.device, dtype: torch.dtype, kv_tokens: int,
               max_seq_len: int, quantize: str = "", implementation: str = "auto",
               compile: bool = False, graphs: int = 0, memory_fraction: float = 0.0) -> LoadedModel:
    """Loads the weights and tokenizer and builds the batched runner with its paged KV cache of
    `kv_tokens` positions (at least one sequence of `max_seq_len`, itself capped by the model's
    context) for sequences of up to `max_seq_len` tokens, with its
    weights as `quantize` says ("" as stored, "int8"), on the forward path `implementation`
    names ("auto": the lean one where the model's config allows, else transformers'), with what pays
    compiled (and compiled now) when `compile` says so; on a GPU, with decode steps of up to `graphs`
    rows as CUDA graphs (0: none), and with `memory_fraction` its KV cache what that share of the
    device's memory leaves after the weights (`gpu_kv_tokens`; at least `kv_tokens`' worth)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise NotFound(f"no model at {path}", reason="MODEL_PATH_NOT_FOUND", metadata={"path": path})
    try:
        config = json.loads((directory / "config.json").read_text())
    except ValueError:
        raise FailedPrecondition(f"the config.json of {name} does not parse", reason="BAD_MODEL_CONFIG",
                                 metadata={"model": name}) from None
    path_taken = _implementation(config, implementation)
    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=False,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        log.error("cannot load %s from %s: %s", name, path, exc)
        raise FailedPrecondition(f"the weights of {name} do not load", reason="MODEL_LOAD_FAILED",
                                 metadata={"model": name}) from None
    model.to(device).eval()
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    max_len = min(context, max_seq_len)
    if path_taken == architectures.LEAN:      # (sizes its cache once its fused weights replace the model's)
        runner: Runner = LlamaRunner(model, kv_tokens, max_len, quantize, compile, graphs, memory_fraction)
    else:
        try:
            kv_tokens = fitted_kv_tokens(device, kv_tokens, memory_fraction, kv_bytes_per_token(model.config, dtype))
            runner = GenericRunner(model, kv_tokens, max_len, quantize, compile)
        except Unsupported as exc:
            architecture = architectures.architecture_of(config)
            raise FailedPrecondition(f"{architecture} does not run on llmos's engine: {exc}",
                                     reason="ARCHITECTURE_NOT_SUPPORTED",
                                     metadata={"architecture": architecture}) from None
    eos = _eos_ids(model, tokenizer)
    del model  # the runner keeps what it needs
    log.info("loaded %s on %s in %s%s through the %s forward%s in %.2fs (%d bytes with a KV cache of %d blocks of "
             "%d positions; sequences up to %d)", name, device, dtype, f" with {quantize} weights" if quantize else "",
             path_taken, ", decode attention compiled" if runner.cache.kernel else "", time.monotonic() - started,
             runner.nbytes, runner.cache.blocks - 1, BLOCK, runner.max_len)
    return LoadedModel(name, runner, tokenizer, device, dtype, runner.nbytes, runner.max_len, eos, quantize)
