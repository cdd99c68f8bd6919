"""A lean batched forward pass for Llama-family models, over the paged KV cache.

The weights come from a loaded transformers model (q/k/v and gate/up fused into
one matrix each); the rotary tables from its own rotary embedding. One call runs
every token of a step through the weights once: the newest token of each
decoding sequence and a chunk of each prefilling prompt, flattened into one
batch; attention is then done per part (`attention.py`).

In float32 on the CPU every matrix of the layers and the LM head is multiplied by oneDNN's
prepacked kernel, and with `quantize="int8"` as int8 (`matmul.py`); a tied LM head gets a copy
of its own; norms, attention, the embedding table and the KV cache stay in the model's dtype.

Batch-invariant: a sequence's output does not depend on what else is in its step. Attention
reads keys in whole blocks (`attention.py`); bfloat16 matrix products on the CPU keep each
row's reduction order whatever the number of rows, as do oneDNN's prepacked float32 products,
so greedy output in either dtype is the same alone and in a batch, bit for bit (tested).

LoRA adapters (`lora.py`) add their part to the fused products' outputs, per row; a row of the
base model gets zero added, and a step without adapters runs as it would without them.

In bf16 with every part through the engine's kernels (the weights in pairs, the fused element-wise
kernels, attention through its kernel), a step without adapters runs the layers in one native call
(`native.llama_layers`): the same kernels in the same order, so the same bits, without ~270 trips
back to the interpreter a step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from llmos.common.domain import QUANTIZATIONS

from . import native
from .attention import LayerShape, PagedCache, Part, Step, attend, first_line, gpu_kernels, pool_blocks
from .lora import Adapter, AdapterStacks, LoraBatch
from .matmul import PairedWeight, Weight, linear, prepare, tensors_of, unique_bytes
from .memory import fitted_kv_tokens, kv_bytes_per_token

log = logging.getLogger(__name__)


@dataclass
class _Layer:
    ln1: torch.Tensor
    wqkv: Weight
    bqkv: torch.Tensor | None
    wo: Weight
    ln2: torch.Tensor
    w_gate_up: Weight
    w_down: Weight


class LlamaRunner:
    implementation = "llmos"
    # Runs LoRA adapters (`lora.py`): a step's rows each through their own adapter, or none.
    supports_adapters = True

    def __init__(self, model: Any, kv_tokens: int, max_len: int, quantize: str = "", compile: bool = False,
                 graphs: int = 0, memory_fraction: float = 0.0) -> None:
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantize!r}")
        self.quantize = quantize
        config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.max_len = max_len
        self.num_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.act = ACT2FN[config.hidden_act]
        self.vocab_size = config.vocab_size
        inner = model.model
        with torch.no_grad():
            self.layers = [self._fuse(layer) for layer in inner.layers]
            self.embed = inner.embed_tokens.weight
            self.norm = inner.norm.weight
            for layer in self.layers:
                for name in ("wqkv", "wo", "w_gate_up", "w_down"):
                    setattr(layer, name, prepare(getattr(layer, name), quantize, self.device, self.dtype,
                                                 biased=name == "wqkv" and layer.bqkv is not None))
            self.lm_head = prepare(model.lm_head.weight, quantize, self.device, self.dtype)
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, device=self.device, dtype=self.dtype), positions)
            self.cos, self.sin = cos[0], sin[0]
        shape = LayerShape(self.kv_heads, self.head_dim, self.head_dim)
        # On a GPU every kernel and graph runs on the model's device, whichever is current.
        self._on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        kv_tokens = fitted_kv_tokens(self.device, kv_tokens, memory_fraction, kv_bytes_per_token(config, self.dtype))
        gpu = gpu_kernels(self.device, self.dtype) if compile else None
        self.cache = PagedCache([shape] * len(self.layers), pool_blocks(kv_tokens, max_len), self.dtype, self.device,
                                compile, spare=gpu is not None and graphs > 0)
        self.cache.warm(self.num_heads)
        # The element-wise work between the products through the engine's fused kernels (`native.py` on the
        # CPU, `gpu_kernels.py` on a GPU), where the attention kernel runs: one call each where torch takes
        # five to eight operators.
        self.ops = None
        if self.cache.kernel is native.paged_attention and self.dtype in (torch.bfloat16, torch.float32):
            self.ops = native
        elif gpu is not None and self.cache.kernel is gpu.paged_attention:
            self.ops = gpu
        self.fused = self.ops is not None
        self.fused_silu = self.fused and config.hidden_act == "silu"
        hidden, inner = config.hidden_size, config.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        # (in, out) features of each projection a LoRA adapter may adapt.
        self.module_shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
                              "o_proj": (q, hidden), "gate_proj": (hidden, inner), "up_proj": (hidden, inner),
                              "down_proj": (inner, hidden)}
        self.adapters = AdapterStacks(self.module_shapes, len(self.layers), self.device, self.dtype)
        self.stack = self._stack_weights(inner)
        # Decode steps of up to `graphs` rows as CUDA graphs (`graphs.py`), where every part has its kernel.
        self.graphs = None
        if gpu is not None and self.ops is gpu:
            self._warm_gpu_ops()
        if graphs > 0 and self.cache.scratch is not None and self.fused_silu:
            from .graphs import DecodeGraphs
            try:
                with self._on_device:
                    self.graphs = DecodeGraphs(self, graphs)
            except Exception as exc:  # noqa: BLE001 - a graph that does not capture costs speed, not the model
                log.warning("decode steps run without CUDA graphs: %s: %s", type(exc).__name__, first_line(exc))

    def _warm_gpu_ops(self) -> None:
        """Builds the GPU's kernels now (a prompt of one token over block 0, which is zeroed again after),
        a load's time and not the first request's; where one fails, the layers run torch's operators."""
        try:
            with torch.inference_mode(), self._on_device:
                self._forward(torch.zeros(1, dtype=torch.long, device=self.device),
                              Step([Part([0], 0, 1)], self.device), None, None)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        except Exception as exc:  # noqa: BLE001 - a kernel that does not build costs speed, not the model
            log.warning("the engine's GPU kernels do not run here (%s: %s); the layers run torch's operators",
                        type(exc).__name__, first_line(exc))
            self.ops, self.fused, self.fused_silu, self.cache.kernel = None, False, False, None
        finally:
            self.cache.clear([0])

    def _stack_weights(self, inner: int) -> native.StackWeights | None:
        """The layers' weights for `native.llama_layers`, where every part of a layer has its kernel."""
        layers = self.layers
        if not (self.fused_silu and self.ops is native and self.dtype == torch.bfloat16 and self.cache.rounds_prompts()
                and all(isinstance(w, PairedWeight) for layer in layers
                        for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
                and all(layer.bqkv is None for layer in layers)):
            return None
        return native.StackWeights(
            native.pointers([layer.ln1 for layer in layers]), native.pointers([layer.wqkv.pairs for layer in layers]),
            native.pointers([layer.wo.pairs for layer in layers]), native.pointers([layer.ln2 for layer in layers]),
            native.pointers([layer.w_gate_up.pairs for layer in layers]),
            native.pointers([layer.w_down.pairs for layer in layers]), native.pointers(self.cache.keys),
            native.pointers(self.cache.values), self.cache.keys[0].shape[1], inner)

    @staticmethod
    def _fuse(layer: Any) -> _Layer:
        """The layer's weights, q/k/v and gate/up each one matrix. The fused copies replace the model's
        own (dropped from it, so a layer's weights are never held twice for long: on a GPU the KV cache
        is sized from what is free after them)."""
        attn, mlp = layer.self_attn, layer.mlp
        biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        fused = _Layer(
            ln1=layer.input_layernorm.weight,
            wqkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous(),
            bqkv=torch.cat(biases).contiguous() if all(b is not None for b in biases) else None,
            wo=attn.o_proj.weight,
            ln2=layer.post_attention_layernorm.weight,
            w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
            w_down=mlp.down_proj.weight)
        for projection in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            projection.weight = None
            projection.bias = None
        return fused

    @property
    def nbytes(self) -> int:
        """Bytes held: weights (shared tensors once) and the KV cache."""
        weights = [v for layer in self.layers for v in vars(layer).values()] + [
            self.embed, self.norm, self.lm_head, self.cos, self.sin]
        graphs = 0 if self.graphs is None else self.graphs.bytes
        return unique_bytes([t for w in weights for t in tensors_of(w)] + self.cache.tensors) + graphs

    @property
    def layer_count(self) -> int:
        return len(self.layers)

    def release_adapter(self, adapter: Adapter) -> None:
        """Drops what the runner keeps of `adapter` (its stacks with others) once it is unloaded;
        on the engine driver's thread."""
        self.adapters.forget(adapter)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMS norm computed in float32, as the model was trained (F.rms_norm stays in bf16)."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _add_norm(self, x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor,
                  rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x + add (x when none) and its RMS norm (of `rows` only, when given): through the fused kernel
        (x added to in place) or torch's operators."""
        if self.fused:
            h = self.ops.add_rms_norm(x, add, weight, self.eps)
            return x, h if rows is None else h[rows]
        if add is not None:
            x = x + add
        return x, self._rms(x if rows is None else x[rows], weight)

    def _rotate_store(self, qkv: torch.Tensor, step: Step, index: int,
                      tables: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The rotary embedding of the q and k heads at the start of each row of qkv [rows, hq + hk, d],
        the keys with the values stored in layer `index`'s cache; returns the queries [rows, hq, d].
        Through the fused kernel (one pass, the keys and values straight into their slots), or torch's
        operators with the step's cos and sin rows `tables`."""
        hq, hk, d = self.num_heads, self.kv_heads, self.head_dim
        if tables is None:
            return self.ops.rotary_store(qkv, hq, hk, d, self.cos, self.sin, step.positions, step.slots,
                                       self.cache.keys[index], self.cache.values[index])
        qk = self._rope(qkv[:, :(hq + hk) * d].view(qkv.shape[0], hq + hk, d), *tables)
        self.cache.write(step, index, qk[:, hq:], qkv[:, (hq + hk) * d:].view(qkv.shape[0], hk, d))
        return qk[:, :hq]

    def _gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused_silu:
            return self.ops.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: Step, logit_rows: torch.Tensor,
                lora: LoraBatch | None = None, begin: Callable[[], None] | None = None) -> torch.Tensor:
        """Runs one step (the flat batch `step` describes), each row through its LoRA adapter
        where `lora` gives it one; returns the logits of the rows `logit_rows` of the flat batch,
        in the model's dtype (the engine widens to float32 the rows it samples or weighs). A step
        of decoding rows only replays a CUDA graph where one was captured. `begin` is called as the
        layers begin."""
        with self._on_device:
            if lora is None and self.graphs is not None and self.graphs.fits(step):
                if begin is not None:
                    begin()
                logits = self.graphs.run(tokens, step, self.layers_forward)
                return logits if logit_rows.shape[0] == logits.shape[0] else logits[logit_rows]
            return self._forward(tokens, step, logit_rows, lora, begin)

    @torch.inference_mode()
    def layers_forward(self, tokens: torch.Tensor, step: Any) -> torch.Tensor:
        """The logits of every row of `step`, in the model's dtype (what a CUDA graph captures)."""
        return self._forward(tokens, step, None, None)

    def _forward(self, tokens: torch.Tensor, step: Step, logit_rows: torch.Tensor | None,
                 lora: LoraBatch | None, begin: Callable[[], None] | None = None) -> torch.Tensor:
        """`forward` without graphs (every row's logits when `logit_rows` is None). Each residual add is
        made by the norm after it; with `fused`, the element-wise work runs in the engine's fused
        kernels (x, the step's own hidden state, added to in place)."""
        total = tokens.shape[0]
        hq, d = self.num_heads, self.head_dim
        adapted = None if lora is None else self.adapters.step(lora)
        x = F.embedding(tokens, self.embed)
        if lora is None and self.stack is not None and self.fused and self.cache.kernel is not None:
            positions, slots, rows = step.positions, step.slots, step.rows()
            if begin is not None:
                begin()                 # the layers' one native call lets the interpreter go
            pending = native.llama_layers(x, self.stack, self.cos, self.sin, positions, slots, rows,
                                          step.decode_count, hq, self.kv_heads, d, self.eps)
            _, h = self._add_norm(x, pending, self.norm, logit_rows)
            return linear(h, self.lm_head)
        pending = None                  # the last product, added to x by the next norm
        positions = step.positions
        tables = None if self.fused else (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        if begin is not None:
            begin()
        for index, layer in enumerate(self.layers):
            x, h = self._add_norm(x, pending, layer.ln1)
            qkv = linear(h, layer.wqkv, layer.bqkv)
            if adapted:
                adapted.add(index, "qkv", h, qkv)
            q = self._rotate_store(qkv, step, index, tables)
            out = attend(step, self.cache, index, q, d ** -0.5).view(total, hq * d)
            o = linear(out, layer.wo)
            if adapted:
                adapted.add(index, "o", out, o)
            x, h = self._add_norm(x, o, layer.ln2)
            gate_up = linear(h, layer.w_gate_up)
            if adapted:
                adapted.add(index, "gate_up", h, gate_up)
            inner = self._gate(gate_up)
            pending = linear(inner, layer.w_down)
            if adapted:
                adapted.add(index, "down", inner, pending)
        _, h = self._add_norm(x, pending, self.norm, logit_rows)
        return linear(h, self.lm_head)
