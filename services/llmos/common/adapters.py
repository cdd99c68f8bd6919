"""PEFT LoRA adapters: what one holds, read and checked against its base model without torch.

An adapter directory (as PEFT's `save_pretrained` writes it) holds `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are named
`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`: A is [r, in] and
B is [out, r], and the adapted projection computes `W x + scaling * B (A x)`.

`read_adapter` reads the config and the safetensors header only (no tensor is read, nothing is
unpickled) and refuses what the engine does not run: pickled weights, ranks above the limit,
per-module ranks or alphas, modules other than the attention and MLP projections (embeddings,
the LM head, modules saved whole), DoRA, LoRA biases, and tensors whose shapes do not fit the
base model's config.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FailedPrecondition, InvalidArgument

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The projections the engine adapts, and the block of the decoder layer each lives in.
MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight")
# Bytes per element of the safetensors dtypes an adapter may hold.
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_MAX_HEADER = 64 << 20

# Config fields that change the adapted forward in ways the engine does not compute: the field,
# whether its value asks for that, and what it is.
_UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("use_dora", lambda v: bool(v), "DoRA (weight-decomposed LoRA)"),
    ("bias", lambda v: v not in (None, "none"), "trained biases"),
    ("lora_bias", lambda v: bool(v), "a LoRA bias"),
    ("modules_to_save", lambda v: bool(v), "modules saved whole"),
    ("fan_in_fan_out", lambda v: bool(v), "fan-in/fan-out (Conv1D) weights"),
    ("layer_replication", lambda v: bool(v), "layer replication"),
    ("trainable_token_indices", lambda v: bool(v), "trainable token embeddings"),
    ("target_parameters", lambda v: bool(v), "adapted parameters (not modules)"),
    ("alora_invocation_tokens", lambda v: bool(v), "activated LoRA"),
    ("use_qalora", lambda v: bool(v), "QA-LoRA"),
    ("use_bdlora", lambda v: bool(v), "block-diagonal LoRA"),
    ("arrow_config", lambda v: bool(v), "Arrow routing"),
    ("megatron_config", lambda v: bool(v), "Megatron parallel layers"),
)


@dataclass(frozen=True)
class AdapterFacts:
    """What a LoRA adapter holds, as read from its directory."""

    rank: int
    alpha: float
    # Multiplies B (A x): alpha / rank, or alpha / sqrt(rank) with rsLoRA.
    scaling: float
    # The adapted projections' short names ("q_proj", ...), sorted.
    target_modules: tuple[str, ...]
    # Bytes of the adapter's tensors as stored.
    nbytes: int
    # The base model's layers it adapts, ascending.
    layers: tuple[int, ...]
    # Elements of its tensors: bytes on a device are `params` times the element size there.
    params: int = 0

    def nbytes_as(self, element_size: int) -> int:
        """Bytes of its tensors held in a dtype of `element_size` bytes per element."""
        return self.params * element_size


@dataclass(frozen=True)
class TensorKey:
    """Where one adapter tensor goes: `layer`, projection `module`, `part` "A" or "B"."""

    layer: int
    module: str
    part: str


def parse_key(name: str) -> TensorKey | None:
    """The place of a tensor named as PEFT saves LoRA weights; None for any other name."""
    match = _KEY.fullmatch(name)
    if match is None or MODULES.get(match[3]) != match[2]:
        return None
    return TensorKey(int(match[1]), match[3], match[4])


def module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adaptable projection of a Llama-family model of `config`."""
    def number(key: str) -> int:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FailedPrecondition(f"the base model's config has no {key}, so no LoRA adapter fits it",
                                     reason="ADAPTER_BASE_MISMATCH", metadata={"field": key})
        return value

    hidden, inner, heads = number("hidden_size"), number("intermediate_size"), number("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}


def _invalid(directory: Path, message: str, reason: str = "ADAPTER_INVALID", **metadata: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata={"adapter": directory.name, **metadata})


def _unsupported(directory: Path, message: str, reason: str, **metadata: str) -> FailedPrecondition:
    return FailedPrecondition(message, reason=reason, metadata={"adapter": directory.name, **metadata})


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file holds (dtype, shape, data_offsets), from its header alone:
    8 bytes of little-endian length, then that much JSON. Raises ValueError when it is not one."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError("its header length is out of bounds")
        header = json.loads(file.read(length))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    data = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"tensor {name} has no description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(n, int) for n in offsets) or not 0 <= offsets[0] <= offsets[1] <= data):
            raise ValueError(f"tensor {name} has a malformed shape or offsets")
        if dtype in _DTYPES and offsets[1] - offsets[0] != math.prod(shape) * _DTYPES[dtype]:
            raise ValueError(f"tensor {name}'s bytes do not match its shape")
        tensors[name] = entry
    return tensors


def _load_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG
    if not path.is_file():
        raise _invalid(directory, f"{directory.name} has no {CONFIG}: not a PEFT adapter")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _invalid(directory, f"the {CONFIG} of {directory.name} is not JSON") from None
    if not isinstance(config, dict):
        raise _invalid(directory, f"the {CONFIG} of {directory.name} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise _invalid(directory, f"{directory.name} is a {config.get('peft_type')!r} adapter, not LORA",
                       peft_type=str(config.get("peft_type")))
    return config


def _weights(directory: Path) -> Path:
    path = directory / WEIGHTS
    if path.is_file():
        return path
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise _invalid(directory, f"{directory.name} holds its weights as pickle ({', '.join(pickled)}), "
                       f"which is never loaded: save the adapter as safetensors",
                       reason="ADAPTER_PICKLE_WEIGHTS", files=",".join(pickled))
    raise _invalid(directory, f"{directory.name} has no {WEIGHTS}")


def _rank_and_alpha(directory: Path, config: dict[str, Any], max_rank: int) -> tuple[int, float]:
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise _invalid(directory, f"{directory.name} has no positive rank r in its {CONFIG}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise _invalid(directory, f"{directory.name} has no numeric lora_alpha in its {CONFIG}")
    if rank > max_rank:
        raise _unsupported(directory, f"{directory.name} has rank {rank}, above the limit of {max_rank}",
                           "ADAPTER_RANK_UNSUPPORTED", rank=str(rank), max_rank=str(max_rank))
    for field, default in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pattern = config.get(field) or {}
        differing = sorted(k for k, v in pattern.items() if v != default) if isinstance(pattern, dict) else ["?"]
        if differing:
            raise _unsupported(directory, f"{directory.name} sets its own {field.split('_')[0]} for "
                               f"{', '.join(differing)}; only one rank and alpha for every module is supported",
                               "ADAPTER_RANK_UNSUPPORTED", field=field)
    return rank, float(alpha)


def _check_config_modules(directory: Path, config: dict[str, Any]) -> None:
    for field, asks, what in _UNSUPPORTED:
        if asks(config.get(field)):
            raise _unsupported(directory, f"{directory.name} uses {what} ({field}), which the engine does not run",
                               "ADAPTER_MODULES_UNSUPPORTED", field=field)
    targets = config.get("target_modules")
    # A list names modules; a string is a pattern (or "all-linear"), answered by the tensors saved.
    if isinstance(targets, list):
        others = sorted(str(t) for t in targets if t not in MODULES)
        if others:
            raise _unsupported(directory, f"{directory.name} adapts {', '.join(others)}; only "
                               f"{', '.join(MODULES)} can be adapted", "ADAPTER_MODULES_UNSUPPORTED",
                               modules=",".join(others))


def read_adapter(directory: Path, base_config: dict[str, Any], max_rank: int) -> AdapterFacts:
    """Reads and checks the PEFT LoRA adapter in `directory` against the base model whose
    `config.json` is `base_config`, allowing ranks up to `max_rank`.

    Raises InvalidArgument (ADAPTER_INVALID: not a LoRA adapter or not readable;
    ADAPTER_PICKLE_WEIGHTS: weights only as pickle) or FailedPrecondition
    (ADAPTER_RANK_UNSUPPORTED, ADAPTER_MODULES_UNSUPPORTED, ADAPTER_BASE_MISMATCH).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise _invalid(directory, f"no adapter directory {directory.name}")
    config = _load_config(directory)
    weights = _weights(directory)
    rank, alpha = _rank_and_alpha(directory, config, max_rank)
    _check_config_modules(directory, config)
    try:
        tensors = read_header(weights)
    except RecursionError:
        raise _invalid(directory, f"the {WEIGHTS} of {directory.name} has a header nested too deep") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _invalid(directory, f"the {WEIGHTS} of {directory.name} is not a safetensors file: {exc}") from None
    shapes = module_shapes(base_config)
    layer_count = base_config.get("num_hidden_layers")
    parts: dict[tuple[int, str], set[str]] = {}
    nbytes = params = 0
    for name, entry in sorted(tensors.items()):
        key = parse_key(name)
        if key is None:
            what = ("the embeddings" if "embed" in name else "the LM head" if "lm_head" in name
                    else "DoRA magnitudes" if "magnitude" in name else "a module other than the projections")
            raise _unsupported(directory, f"{directory.name} holds tensor {name} ({what}); only LoRA A and B "
                               f"of {', '.join(MODULES)} are supported", "ADAPTER_MODULES_UNSUPPORTED", tensor=name)
        if entry["dtype"] not in _DTYPES:
            raise _invalid(directory, f"tensor {name} of {directory.name} is {entry['dtype']}, not a float type",
                           tensor=name)
        if not (isinstance(layer_count, int) and key.layer < layer_count):
            raise _unsupported(directory, f"{directory.name} does not fit the base model: tensor {name} is of "
                               f"layer {key.layer}, the base model has {layer_count} layers",
                               "ADAPTER_BASE_MISMATCH", tensor=name, expected=f"{layer_count} layers",
                               found=f"layer {key.layer}")
        shape = entry["shape"]
        if len(shape) != 2 or shape[0 if key.part == "A" else 1] != rank:
            raise _invalid(directory, f"tensor {name} of {directory.name} has shape {shape}, not of rank {rank} "
                           f"as its {CONFIG} says", tensor=name)
        features_in, features_out = shapes[key.module]
        expected = [rank, features_in] if key.part == "A" else [features_out, rank]
        if shape != expected:
            raise _unsupported(directory, f"{directory.name} does not fit the base model: tensor {name} has "
                               f"shape {shape}, the base model needs {expected}", "ADAPTER_BASE_MISMATCH",
                               tensor=name, expected=str(expected), found=str(shape))
        parts.setdefault((key.layer, key.module), set()).add(key.part)
        nbytes += entry["data_offsets"][1] - entry["data_offsets"][0]
        params += math.prod(entry["shape"])
    halves = sorted(f"layer {layer} {module}" for (layer, module), got in parts.items() if got != {"A", "B"})
    if halves:
        raise _invalid(directory, f"{directory.name} has only one of lora_A and lora_B for {', '.join(halves)}")
    if not parts:
        raise _invalid(directory, f"{directory.name} holds no LoRA tensors")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return AdapterFacts(rank=rank, alpha=alpha, scaling=scaling,
                        target_modules=tuple(sorted({module for _, module in parts})), nbytes=nbytes,
                        layers=tuple(sorted({layer for layer, _ in parts})), params=params)
