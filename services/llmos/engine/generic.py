"""The generic forward path: any causal LM transformers loads, run by its own code.

The model's forward runs as written, over the step's flat batch as one sequence of T tokens
([1, T], each token with its own position id), with an attention function of llmos's own in
place of sdpa (transformers' attention interface). That function writes each layer's keys and
values into llmos's paged cache and attends each sequence against its own blocks (`attention.py`),
honouring the scaling, sliding window and logit soft-capping the model's layer asks for; the
model builds no mask (llmos's implementation is not in transformers' mask registry) and keeps
no cache of its own. So the engine's batching, KV accounting, prefix cache, cancellation and
sampling are the same as on the lean path (`llama.py`), whatever the architecture.

Loading probes the model with one token to find its attention layers and the shape of each
one's keys and values (the cache is sized from that, exactly), then checks a short prompt and
one decoded token against the model's own eager forward; a model whose attention llmos cannot
reproduce (attention sinks, a mask of its own, ALiBi) is refused with the reason.

The weights' matrices (`nn.Linear`, and GPT-2's `Conv1D`) are swapped for llmos's products:
prepacked for oneDNN in float32 on the CPU, or int8 (`matmul.py`).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.pytorch_utils import Conv1D

from llmos.common.domain import QUANTIZATIONS

from .attention import LayerShape, PagedCache, Part, Step, attend, pool_blocks
from .matmul import Weight, linear, prepare, tensors_of, unique_bytes

log = logging.getLogger(__name__)

ATTENTION = "llmos"
_LAYER = "_llmos_layer"


class Unsupported(Exception):
    """The model's attention is something the generic path cannot run; the message says why."""


# What the attention function is doing on this thread: probing a model's layers, or a step.
_active = threading.local()


@contextmanager
def _doing(current: Any) -> Iterator[None]:
    _active.current = current
    try:
        yield
    finally:
        _active.current = None


class _Probe:
    def __init__(self) -> None:
        self.layers: list[tuple[nn.Module, LayerShape]] = []


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               sliding_window: int | None = None, softcap: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention function signature: query [1, hq, T, d], key [1, hk, T, dk],
    value [1, hk, T, dv] (rotary applied); returns [1, T, hq, dv]."""
    current = getattr(_active, "current", None)
    if isinstance(current, _Probe):
        return _probe(current, module, query, key, value, attention_mask, kwargs)
    if current is None:
        raise RuntimeError("llmos attention called outside an llmos step")
    runner, step = current
    layer = getattr(module, _LAYER)
    q = query[0].transpose(0, 1)                               # [T, hq, d]
    runner.cache.write(step, layer, key[0].transpose(0, 1), value[0].transpose(0, 1))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(step, runner.cache, layer, q, scale, softcap, sliding_window)
    return out.unsqueeze(0), None


def _probe(probe: _Probe, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor, None]:
    if kwargs.get("s_aux") is not None:
        raise Unsupported("its attention has sinks (s_aux)")
    if attention_mask is not None:
        raise Unsupported("it builds an attention mask of its own")
    if query.shape[0] != 1 or key.shape[2] != 1:
        raise Unsupported("its attention layers do not see one new token at a time")
    if any(m is module for m, _ in probe.layers):
        raise Unsupported("an attention layer runs twice in one forward pass")
    hq, hk = query.shape[1], key.shape[1]
    if hq % hk:
        raise Unsupported(f"{hq} query heads do not group over {hk} key heads")
    setattr(module, _LAYER, len(probe.layers))
    probe.layers.append((module, LayerShape(hk, key.shape[-1], value.shape[-1])))
    # One token sees only itself: each query head gets its KV head's value.
    return value.repeat_interleave(hq // hk, dim=1).transpose(1, 2), None


AttentionInterface.register(ATTENTION, _attention)


class _Linear(nn.Module):
    """A layer's matrix as llmos multiplies it."""

    def __init__(self, weight: Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight_ = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight_, self.bias)


def _swap_linears(model: nn.Module, quantize: str, device: torch.device, dtype: torch.dtype) -> list[_Linear]:
    """Replaces each `nn.Linear` (and GPT-2's `Conv1D`, its transpose) with llmos's product,
    where that differs from `F.linear`; returns the new modules."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                weight = child.weight.detach()
            elif type(child) is Conv1D:
                weight = child.weight.detach().t()
            else:
                continue
            bias = None if child.bias is None else child.bias.detach()
            prepared = prepare(weight, quantize, device, dtype, biased=bias is not None)
            if prepared is weight:
                continue
            module = _Linear(prepared, bias)
            setattr(parent, name, module)
            swapped.append(module)
    return swapped


class GenericRunner:
    """Runs any causal LM through its own transformers code over llmos's paged cache; the same
    interface as `LlamaRunner`."""

    implementation = "transformers"
    # LoRA adapters run on the lean forward only.
    supports_adapters = False

    def __init__(self, model: Any, kv_tokens: int, max_len: int, quantize: str = "", compile: bool = False) -> None:
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantize!r}")
        if not getattr(type(model), "_supports_attention_backend", False):
            raise Unsupported("its transformers code does not take an attention function")
        self.model = model
        self.quantize = quantize
        self.device, self.dtype = model.device, model.dtype
        self.max_len = max_len
        self.vocab_size = model.config.vocab_size
        self._trims_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        model.set_attn_implementation(ATTENTION)
        with torch.no_grad():
            self._linears = _swap_linears(model, quantize, self.device, self.dtype)
        probe = _Probe()
        try:
            with _doing(probe):
                self._run(torch.zeros(1, dtype=torch.long, device=self.device),
                          torch.zeros(1, dtype=torch.long, device=self.device), None)
            if not probe.layers:
                raise Unsupported("it calls no attention function")
            self.cache = PagedCache([shape for _, shape in probe.layers], pool_blocks(kv_tokens, max_len), self.dtype,
                                    self.device, compile)
            self.cache.warm()
            self._check()           # (decoding through the kernel, where it built)
        except Unsupported:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's own code failed under llmos's attention
            log.exception("the forward of %s fails under llmos's attention", type(model).__name__)
            raise Unsupported(f"its forward fails under llmos's attention ({type(exc).__name__})") from None

    @property
    def nbytes(self) -> int:
        """Bytes held: the model's parameters and buffers (shared ones once), its swapped
        matrices, and the KV cache."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.cache.tensors]
        for module in self._linears:
            tensors += [*tensors_of(module.weight_), *tensors_of(module.bias)]
        return unique_bytes(tensors)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, logit_rows: torch.Tensor | None) -> torch.Tensor:
        extra = {}
        if self._trims_logits and logit_rows is not None:
            extra["logits_to_keep"] = logit_rows
        out = self.model(input_ids=tokens[None], position_ids=positions[None], use_cache=False, **extra)
        logits = out.logits[0]
        return logits if self._trims_logits or logit_rows is None else logits[logit_rows]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: Step, logit_rows: torch.Tensor,
                begin: Callable[[], None] | None = None) -> torch.Tensor:
        """Runs one step (the flat batch `step` describes); returns float32 logits of the rows
        `logit_rows` of the flat batch. `begin` is called as the model's forward begins."""
        positions = step.positions
        if begin is not None:
            begin()
        with _doing((self, step)):
            return self._run(tokens, positions, logit_rows).float()

    def _check(self, length: int = 8) -> None:
        """A prompt of `length` random tokens in block 1, then one decoded token, against the
        model's own eager forward over the same tokens; a mismatch refuses the model."""
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (length,), generator=generator).to(self.device)
        at = torch.arange(length, device=self.device)
        ours = torch.cat([
            self.forward(ids[:-1], Step([Part([1], 0, length - 1)], self.device), at[-2:-1]),
            self.forward(ids[-1:], Step([Part([1], length - 1, 1, decode=True)], self.device), at[:1])])
        self.model.set_attn_implementation("eager")
        try:
            with torch.inference_mode():
                theirs = self.model(input_ids=ids[None], use_cache=False).logits[0, -2:].float()
        finally:
            self.model.set_attn_implementation(ATTENTION)
        self.cache.clear([1])
        tolerance = 1e-3 if self.dtype == torch.float32 else 5e-2
        scale = theirs.abs().max().clamp(min=1.0)
        if not torch.allclose(ours, theirs, rtol=0, atol=float(tolerance * scale)):
            raise Unsupported(f"its attention does not match transformers' own under llmos's "
                              f"(largest logit difference {float((ours - theirs).abs().max()):.3g})")
