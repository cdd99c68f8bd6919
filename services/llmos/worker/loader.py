"""Loads a model directory from the model store onto a device."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmos.common.devices import cpu_has_bf16
from llmos.common.errors import FailedPrecondition, NotFound

from .llama import SUPPORTED_ARCHITECTURES, LlamaRunner

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    runner: LlamaRunner
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    measured_bytes: int
    # Longest sequence (prompt + output) one cache slot holds.
    max_seq_len: int
    eos_ids: frozenset[int]
    # The weight variant it runs ("" as stored, "int8").
    quantization: str = ""

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


def load_model(name: str, path: str, device: torch.device, dtype: torch.dtype, slots: int,
               max_seq_len: int, quantize: str = "") -> LoadedModel:
    """Loads the weights and tokenizer and builds the batched runner with its KV cache of
    `slots` sequences of up to `max_seq_len` tokens (capped by the model's context), with its
    weights as `quantize` says ("" as stored, "int8")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise NotFound(f"no model at {path}", reason="MODEL_PATH_NOT_FOUND", metadata={"path": path})
    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=False,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        log.error("cannot load %s from %s: %s", name, path, exc)
        raise FailedPrecondition(f"the weights of {name} do not load", reason="MODEL_LOAD_FAILED",
                                 metadata={"model": name}) from None
    architecture = (model.config.architectures or ["unknown"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise FailedPrecondition(
            f"the engine does not run {architecture} models yet (it runs "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))})", reason="ARCHITECTURE_NOT_SUPPORTED",
            metadata={"architecture": architecture})
    model.to(device).eval()
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    runner = LlamaRunner(model, slots, min(context, max_seq_len), quantize)
    eos = _eos_ids(model, tokenizer)
    del model  # the runner keeps the tensors it needs
    log.info("loaded %s on %s in %s%s in %.2fs (%d bytes with a KV cache of %d x %d tokens)", name,
             device, dtype, f" with {quantize} weights" if quantize else "", time.monotonic() - started,
             runner.nbytes, slots, runner.max_len)
    return LoadedModel(name, runner, tokenizer, device, dtype, runner.nbytes, runner.max_len, eos, quantize)
