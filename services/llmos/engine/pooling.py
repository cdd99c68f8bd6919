"""Pooling models: one forward over the input and no generation. Embeddings (an encoder's or a
causal LM's hidden states pooled: mean, first token or last token, as sentence-transformers'
files say, then normalized where they say so), sequence classification (the softmax of the
classifier's logits) and cross-encoder scores (the sigmoid of its one logit, per text pair).

A `PoolingModel` runs in float32 (these models are small; their vectors then equal the
reference's to 1e-6) on the worker's driver thread, between the generation engines' steps.
`PoolBatcher` gathers the inputs of concurrent requests into batches (sorted by length, so
little padding), each request's results handed back to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmos.common import architectures
from llmos.common.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

# Most inputs, and padded tokens, in one forward.
BATCH_INPUTS = 64
BATCH_TOKENS = 16384
MIN_BATCH = 8
PADDING = 0.25


@dataclass(frozen=True)
class PoolingSpec:
    """How hidden states become one vector: "mean" (over the real tokens), "cls" (the first
    token) or "last" (the last real token); whether it is then normalized to length 1; and the
    shorter sizes the model was trained to be cut to (Matryoshka)."""

    mode: str
    normalize: bool
    matryoshka: tuple[int, ...] = ()


def pooling_spec(directory: Path, config: dict) -> PoolingSpec:
    """As sentence-transformers' `modules.json` (its Pooling and Normalize modules) says; without
    it: mean pooling for an encoder, the last token for a causal LM, normalized."""
    causal = architectures.is_causal(config)
    matryoshka = tuple(int(d) for d in config.get("matryoshka_dimensions") or ())
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return PoolingSpec("last" if causal else "mean", True, matryoshka)
    modules = json.loads(modules_file.read_text())
    mode, normalize = "last" if causal else "mean", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            settings_file = directory / module.get("path", "") / "config.json"
            settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
            if settings.get("pooling_mode_cls_token"):
                mode = "cls"
            elif settings.get("pooling_mode_lasttoken"):
                mode = "last"
            elif settings.get("pooling_mode_mean_tokens"):
                mode = "mean"
    return PoolingSpec(mode, normalize, matryoshka)


@dataclass
class PoolingModel:
    name: str
    task: str
    model: Any
    tokenizer: Any
    device: torch.device
    spec: PoolingSpec
    # Most tokens of one input (a pair: both together).
    max_len: int
    # For classify: the label of each output.
    labels: list[str]
    measured_bytes: int
    dtype: torch.dtype = torch.float32
    implementation: str = "transformers"
    quantization: str = ""

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str], pairs: list[str], truncate: int) -> list[dict[str, list[int]]]:
        """Each input tokenized as the model expects (special tokens, and a pair as one input);
        one longer than the model's limit is INVALID_ARGUMENT unless `truncate` says to cut it."""
        limit = self.max_len if truncate < 0 else min(truncate, self.max_len) if truncate else None
        encoded = self.tokenizer(texts, pairs or None, add_special_tokens=True, max_length=limit,
                                 truncation=limit is not None and ("longest_first" if pairs else True))
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        out = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
        for i, item in enumerate(out):
            if len(item["input_ids"]) > self.max_len:
                raise InvalidArgument.field(f"inputs[{i}]", f"is {len(item['input_ids'])} tokens; this model reads "
                                            f"at most {self.max_len} (truncate_prompt_tokens cuts it)",
                                            reason="INPUT_TOO_LONG")
        return out

    @torch.inference_mode()
    def run(self, batch: list[dict[str, list[int]]]) -> torch.Tensor:
        """The outputs of a batch of encoded inputs (padded together): vectors (embed), label
        probabilities (classify) or scores (score), one row each."""
        width = max(len(item["input_ids"]) for item in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        types = torch.zeros((len(batch), width), dtype=torch.long) if "token_type_ids" in batch[0] else None
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.tensor(item["token_type_ids"])
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if types is not None:
            inputs["token_type_ids"] = types.to(self.device)
        output = self.model(**inputs)
        if self.task == architectures.CLASSIFY:
            return torch.softmax(output.logits.float(), dim=-1).cpu()
        if self.task == architectures.SCORE:
            return torch.sigmoid(output.logits.float()[:, 0]).cpu()
        return self.pool(output.last_hidden_state.float(), inputs["attention_mask"]).cpu()

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.spec.mode == "cls":
            vectors = hidden[:, 0]
        elif self.spec.mode == "last":
            vectors = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(dim=1) - 1]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        if self.spec.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        return vectors


def load_pooling_model(name: str, path: str, device: torch.device, task: str) -> PoolingModel:
    """Loads a model for a pooling task: transformers' AutoModelForSequenceClassification for
    classify and score, AutoModel (its hidden states) for embed."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise NotFound(f"no model at {path}", reason="MODEL_PATH_NOT_FOUND", metadata={"path": path})
    config = json.loads((directory / "config.json").read_text())
    architectures.check_servable(config, task)
    started = time.monotonic()
    cls = AutoModelForSequenceClassification if task in (architectures.CLASSIFY, architectures.SCORE) else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        model = cls.from_pretrained(directory, dtype=torch.float32, trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError) as exc:
        log.error("cannot load %s from %s: %s", name, path, exc)
        raise FailedPrecondition(f"the weights of {name} do not load", reason="MODEL_LOAD_FAILED",
                                 metadata={"model": name}) from None
    model.to(device).eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    context = int(getattr(model.config, "max_position_embeddings", 512))
    told = getattr(tokenizer, "model_max_length", None)
    max_len = min(context, told) if isinstance(told, int) and told < 1_000_000 else context
    labels = []
    if task == architectures.CLASSIFY:
        id2label = getattr(model.config, "id2label", None) or {}
        labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    spec = pooling_spec(directory, config)
    log.info("loaded %s on %s for %s (%s pooling%s) in %.2fs (%d bytes; inputs up to %d tokens)", name, device, task,
             spec.mode, ", normalized" if spec.normalize else "", time.monotonic() - started, nbytes, max_len)
    return PoolingModel(name, task, model, tokenizer, device, spec, max_len, labels, nbytes)


@dataclass
class _Waiting:
    items: list[dict[str, list[int]]]
    future: asyncio.Future
    results: list[torch.Tensor | None] = field(default_factory=list)
    left: int = 0


class PoolBatcher:
    """Gathers the encoded inputs of a model's concurrent requests into batches, each run on the
    worker's driver thread (`call`), and hands each request its rows, in order."""

    def __init__(self, model: PoolingModel, call: Callable[..., Future]) -> None:
        self.model = model
        self._call = call
        self._queue: list[tuple[_Waiting, int]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.running = 0

    async def run(self, items: list[dict[str, list[int]]]) -> torch.Tensor:
        """The model's outputs for `items`, one row each, in order."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve())
        waiting = _Waiting(items, asyncio.get_running_loop().create_future(), [None] * len(items), len(items))
        self._queue.extend((waiting, i) for i in range(len(items)))
        self._wake.set()
        self.running += 1
        try:
            return await waiting.future
        finally:
            self.running -= 1
            if not waiting.future.done():       # cancelled: its rows not yet run are dropped
                self._queue = [(w, i) for w, i in self._queue if w is not waiting]

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._take()
                try:
                    rows = await asyncio.wrap_future(self._call(self.model.run, [w.items[i] for w, i in batch]))
                except Exception as exc:  # noqa: BLE001 - each request of the batch hears of it
                    for waiting, _ in batch:
                        if not waiting.future.done():
                            waiting.future.set_exception(exc)
                    continue
                for (waiting, i), row in zip(batch, rows, strict=True):
                    waiting.results[i] = row
                    waiting.left -= 1
                    if waiting.left == 0 and not waiting.future.done():
                        waiting.future.set_result(torch.stack(waiting.results))

    def _take(self) -> list[tuple[_Waiting, int]]:
        """The next batch: up to BATCH_INPUTS inputs, shortest first, within BATCH_TOKENS padded,
        and closed early (from MIN_BATCH inputs on) where the next input would make its padding
        more than PADDING of its tokens: a forward's time goes with its padded tokens."""
        self._queue.sort(key=lambda entry: len(entry[0].items[entry[1]]["input_ids"]))
        batch: list[tuple[_Waiting, int]] = []
        tokens = 0
        for entry in self._queue:
            width = len(entry[0].items[entry[1]]["input_ids"])
            padded = width * (len(batch) + 1)
            if batch and (len(batch) >= BATCH_INPUTS or padded > BATCH_TOKENS
                          or (len(batch) >= MIN_BATCH and padded > (1 + PADDING) * (tokens + width))):
                break
            batch.append(entry)
            tokens += width
        self._queue = self._queue[len(batch):]
        return batch

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
