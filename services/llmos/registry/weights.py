"""Facts read from a model directory without loading it: config, tensors, digest."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from llmos.common import architectures
from llmos.common.domain import DEFAULT_KV_CACHE_TOKENS
from llmos.common.errors import FailedPrecondition, InvalidArgument
from llmos.common.tools import format_of

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class WeightFacts:
    architecture: str
    parameter_count: int
    weight_bytes: int
    dtype: str
    context_length: int
    has_chat_template: bool
    num_layers: int
    kv_heads: int
    head_dim: int
    # The engine's forward path for it: "llmos" or "transformers" (`common.architectures`).
    implementation: str = architectures.LEAN
    # How the model writes tool calls (`common.tools.FORMATS`); "" without a chat template.
    tool_call_format: str = ""
    # What it serves (`architectures.TASKS`).
    task: str = architectures.GENERATE


def sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def safetensors_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        if any(p.suffix in PICKLE_SUFFIXES for p in directory.iterdir()):
            raise InvalidArgument.field("source", "holds pickle weights (.bin/.pt), which llmos "
                                        "does not load unless the registry's allow_pickle setting "
                                        "is on; convert them to safetensors",
                                        reason="PICKLE_WEIGHTS_REFUSED")
        raise InvalidArgument.field("source", "holds no *.safetensors files",
                                    reason="NO_WEIGHTS")
    return files


def _tensor_header(path: Path) -> dict:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def read_config(directory: Path, task: str = "") -> dict:
    """The directory's config.json, refused when llmos cannot serve it for `task` (empty: the task
    its files say, `architectures.default_task`)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"model directory has no readable config.json: {exc.__class__.__name__}",
                                 reason="BAD_MODEL_CONFIG") from None
    architectures.check_servable(config, task or task_of(directory, config))
    return config


def task_of(directory: Path, config: dict) -> str:
    """The task a model directory's files say it is for."""
    return architectures.default_task(config, sentence_transformers=(directory / "modules.json").is_file())


def read_facts(directory: Path, task: str = "") -> WeightFacts:
    """Reads config.json, the safetensors headers and the tokenizer config."""
    config = read_config(directory, task)
    params = weight_bytes = 0
    dtypes: dict[str, int] = {}
    for path in safetensors_files(directory):
        for name, info in _tensor_header(path).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            params += count
            weight_bytes += count * _DTYPE_BYTES.get(info["dtype"], 4)
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + count
    main_dtype = max(dtypes, key=dtypes.get) if dtypes else "F32"

    def setting(*names: str, default: int = 0) -> int:
        """The first of `names` the config sets (GPT-2's configs say n_layer, n_head, n_embd...)."""
        return int(next((config[n] for n in names if config.get(n) is not None), default))
    heads = setting("num_attention_heads", "n_head", default=1)
    hidden = setting("hidden_size", "n_embd")
    template = chat_template_of(directory)
    return WeightFacts(
        architecture=architectures.architecture_of(config),
        parameter_count=params,
        weight_bytes=weight_bytes,
        dtype=_DTYPE_NAMES.get(main_dtype, main_dtype.lower()),
        context_length=setting("max_position_embeddings", "n_positions", default=2048),
        has_chat_template=bool(template),
        tool_call_format=format_of(template),
        num_layers=setting("num_hidden_layers", "n_layer"),
        kv_heads=setting("num_key_value_heads", default=heads),
        head_dim=setting("head_dim", default=hidden // heads if heads else 0),
        implementation=architectures.implementation(config) if architectures.is_causal(config) else "transformers",
        task=task or task_of(directory, config),
    )


def chat_template_of(directory: Path) -> str | None:
    """The chat template a model directory holds (in `tokenizer_config.json` or
    `chat_template.jinja`), None without one; a list of named templates reads as their text."""
    template = None
    if (directory / "tokenizer_config.json").exists():
        template = json.loads((directory / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):
        template = "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    if not template and (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text()
    return template or None


@dataclass(frozen=True)
class KvShape:
    """The KV cache a worker allocates per model: a pool of `tokens` positions, in elements of
    `compute_bytes` (the dtype the workers compute in; 0: bf16, with the weights kept at their
    stored dtype)."""

    tokens: int = DEFAULT_KV_CACHE_TOKENS
    compute_bytes: int = 0


def estimate_bytes(facts: WeightFacts, kv: KvShape, overhead_bytes: int) -> int:
    """Weights and the KV cache in the workers' compute dtype (weights at their stored dtype and the
    KV cache in bf16 when it is not known), and runtime overhead."""
    element = kv.compute_bytes or 2
    kv_bytes = facts.num_layers * 2 * facts.kv_heads * facts.head_dim * element * kv.tokens
    if facts.task != architectures.GENERATE:       # a pooling model keeps no cache
        kv_bytes = 0
    weights = facts.parameter_count * kv.compute_bytes if kv.compute_bytes else facts.weight_bytes
    return weights + kv_bytes + overhead_bytes

