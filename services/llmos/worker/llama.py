"""A lean batched forward pass for Llama-family models, over a slot KV cache.

The weights come from a loaded transformers model (q/k/v and gate/up fused into
one matrix each); the rotary tables from its own rotary embedding. One call runs
every token of a step through the weights once: the newest token of each
decoding sequence and a chunk of each prefilling prompt, flattened into one
batch. Attention is then done per part: all decoding sequences together against
the cache (padded to the longest, masked), and each prefill chunk causally
against its own slot.

In float32 on the CPU every matrix of the layers and the LM head is reordered once at load into
oneDNN's blocked layout and multiplied by its prepacked kernel: 14% faster at batch 1, 23% at
16 and 20% in prefill than `F.linear` on this model (the LM head alone twice as fast), and the
same reduction order for a row whatever the number of rows (the plain kernels switch to a
matrix-vector product at one row). A tied LM head gets a copy of its own; the embedding table
stays plain.

With `quantize="int8"` every matrix of the layers and the LM head is kept as int8 with one
float scale per output row (weight-only, symmetric), and multiplied by torch's
`_weight_int8pack_mm`, which reads the int8 weights directly. Its fast kernels take bfloat16
activations, so a float32 model's activations are cast to bfloat16 for those products (and
back); norms, attention, the embedding table and the KV cache stay in the model's dtype.

Batch-invariant: a sequence's output does not depend on what else is in its step. Attention
reads every sequence's keys to a length rounded up to `KEY_BLOCK` positions (the ones beyond
its own masked), so the reductions over keys (softmax, probabilities times values) run whole
vector blocks padded with exact zeros and sum in the same order whatever the longest sequence
of the batch is; a sequence alone and the same sequence in a busy batch reduce alike. bfloat16
matrix products on the CPU keep each row's reduction order whatever the number of rows, as do
oneDNN's prepacked float32 products, so greedy output in either dtype is the same alone and in a
batch, bit for bit (tested).

The cache holds `slots` sequences of up to `max_len` tokens. Sequences occupy
slots 0..n-1; when one leaves, the last moves into its place, so the decoding
batch is always a leading block of the cache and needs no gather.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from llmos.common.domain import QUANTIZATIONS

SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
KEY_BLOCK = 16


MIN_ROWS = 4


def _rows_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` over batches of matrices, `a` given at least `MIN_ROWS` rows (zeros appended; the
    extra rows of the product are to be dropped): float32 products of one to three rows take
    another kernel than four or more, so a prompt chunk of one token would reduce otherwise
    than the same position in a longer chunk."""
    if a.shape[-2] < MIN_ROWS:
        a = torch.cat([a, a.new_zeros(*a.shape[:-2], MIN_ROWS - a.shape[-2], a.shape[-1])], dim=-2)
    return torch.matmul(a, b)


def key_length(positions: int) -> int:
    """Keys an attention reads for `positions` held: whole blocks of `KEY_BLOCK`."""
    return -(-positions // KEY_BLOCK) * KEY_BLOCK


@dataclass(frozen=True)
class Int8Weight:
    """A [out, in] matrix as int8 rows and one bfloat16 scale per row."""

    values: torch.Tensor
    scales: torch.Tensor

    @staticmethod
    def of(weight: torch.Tensor) -> Int8Weight:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        values = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        return Int8Weight(values, scales.to(torch.bfloat16))

    def numel(self) -> int:
        return self.values.numel() + self.scales.numel()


@dataclass(frozen=True)
class PackedWeight:
    """A [out, in] float32 matrix reordered once into oneDNN's blocked layout for its matmul
    (the layout inductor's CPU weight prepacking uses)."""

    packed: torch.Tensor

    @staticmethod
    def of(weight: torch.Tensor) -> PackedWeight:
        return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16))

    def numel(self) -> int:
        return self.packed.numel()


def packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Float32 on the CPU multiplies by oneDNN's prepacked weights."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


Weight = torch.Tensor | Int8Weight | PackedWeight


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, PackedWeight):
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight.packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])
    if isinstance(weight, Int8Weight):
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(rows, weight.values, weight.scales).to(x.dtype)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


@dataclass(frozen=True)
class PrefillChunk:
    """`length` prompt tokens of the sequence in `slot`, starting at position `start`."""

    slot: int
    start: int
    length: int


@dataclass
class _Layer:
    ln1: torch.Tensor
    wqkv: Weight
    bqkv: torch.Tensor | None
    wo: Weight
    ln2: torch.Tensor
    w_gate_up: Weight
    w_down: Weight


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU it lives in anonymous memory, which the kernel hands out
    zero-filled page by page on first touch: no memset of the whole cache at load, and a
    cache that is never filled costs only its address space."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    size = count * torch.empty((), dtype=dtype).element_size()
    if size == 0:
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=dtype, count=count).view(shape)


class LlamaRunner:
    def __init__(self, model: Any, slots: int, max_len: int, quantize: str = "") -> None:
        if quantize not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantize!r}")
        self.quantize = quantize
        config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.slots = slots
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
            self.lm_head = model.lm_head.weight
            if quantize == "int8":
                for layer in self.layers:
                    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
                        setattr(layer, name, Int8Weight.of(getattr(layer, name)))
                self.lm_head = Int8Weight.of(self.lm_head)
            elif packs_weights(self.device, self.dtype):
                for layer in self.layers:
                    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
                        setattr(layer, name, PackedWeight.of(getattr(layer, name)))
                self.lm_head = PackedWeight.of(self.lm_head)
            positions = torch.arange(max_len, device=self.device)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, device=self.device, dtype=self.dtype), positions)
            self.cos, self.sin = cos[0], sin[0]
        # K is kept transposed ([.., head_dim, position]) and V as is ([.., position, head_dim]),
        # so the decode batch's K^T and V are strided matrices the matmuls read in place.
        layers, self.cache_len = len(self.layers), key_length(max_len)
        self.k_cache = zeroed((layers, slots, self.kv_heads, self.head_dim, self.cache_len), self.dtype, self.device)
        self.v_cache = zeroed((layers, slots, self.kv_heads, self.cache_len, self.head_dim), self.dtype, self.device)

    @staticmethod
    def _fuse(layer: Any) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        return _Layer(
            ln1=layer.input_layernorm.weight,
            wqkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous(),
            bqkv=torch.cat(biases).contiguous() if all(b is not None for b in biases) else None,
            wo=attn.o_proj.weight,
            ln2=layer.post_attention_layernorm.weight,
            w_gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
            w_down=mlp.down_proj.weight)

    @property
    def kv_positions(self) -> int:
        """Token positions the KV cache holds, over all its slots."""
        return self.slots * self.max_len

    @property
    def nbytes(self) -> int:
        """Bytes held: weights (shared tensors once) and the KV cache."""
        tensors = {}
        for t in [v for layer in self.layers for v in vars(layer).values()] + [
                self.embed, self.norm, self.lm_head, self.cos, self.sin, self.k_cache, self.v_cache]:
            for part in ((t.values, t.scales) if isinstance(t, Int8Weight) else (t.packed,)
                         if isinstance(t, PackedWeight) else (t,) if t is not None else ()):
                tensors[id(part)] = part
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copies the first `length` cached positions of `source` into `target`."""
        self.k_cache[:, target, :, :, :length] = self.k_cache[:, source, :, :, :length]
        self.v_cache[:, target, :, :length] = self.v_cache[:, source, :, :length]

    def _write_indices(self, slots: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices into one layer's K and V caches for each (token, head, dim) written."""
        hk, d, m = self.kv_heads, self.head_dim, self.cache_len
        heads = (slots[:, None] * hk + torch.arange(hk, device=self.device)[None, :])        # [T, hk]
        dims = torch.arange(d, device=self.device)
        k_index = ((heads[:, :, None] * d + dims) * m + positions[:, None, None]).reshape(-1)
        v_index = ((heads * m + positions[:, None])[:, :, None] * d + dims).reshape(-1)
        return k_index, v_index

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

    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          bias: torch.Tensor) -> torch.Tensor:
        """One query per row: plain batched matmuls beat the flash kernel at this shape.

        q: [n, hq, 1, d]; k: [n, hk, d, L] (transposed); v: [n, hk, L, d]; bias: [n, 1, 1, L] (0 or -inf). The query
        heads sharing a KV head are grouped, so K and V are never repeated.
        """
        n, hq, _, d = q.shape
        hk = k.shape[1]
        groups = hq // hk
        qg = q.view(n, hk, groups, d)
        scores = torch.matmul(qg, k).float() * (d ** -0.5) + bias
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v).view(n, hq, 1, d)

    def _causal_bias(self, chunk: PrefillChunk) -> torch.Tensor:
        """[c, key_length(start + c)]: 0 where a prompt position may see a key, -inf after it."""
        end = chunk.start + chunk.length
        keys = torch.arange(key_length(end), device=self.device)[None, :]
        queries = torch.arange(chunk.start, end, device=self.device)[:, None]
        return torch.zeros(chunk.length, keys.shape[1], device=self.device).masked_fill_(keys > queries, float("-inf"))

    def _chunk_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         bias: torch.Tensor) -> torch.Tensor:
        """Causal attention of one prompt chunk against its slot: q [hq, c, d]; k [hk, d, L]
        (transposed); v [hk, L, d]."""
        hq, c, d = q.shape
        hk = k.shape[0]
        rows = (hq // hk) * c
        qg = q.reshape(hk, rows, d)                        # query heads grouped by their KV head
        scores = _rows_matmul(qg, k)[:, :rows].float().reshape(hk, hq // hk, c, -1) * (d ** -0.5)
        probs = torch.softmax(scores + bias, dim=-1).to(v.dtype).view(hk, rows, -1)
        return _rows_matmul(probs, v)[:, :rows].reshape(hq, c, d)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                decode_count: int, active: int, prefills: list[PrefillChunk],
                logit_rows: torch.Tensor) -> torch.Tensor:
        """Runs one step; returns float32 logits of the rows `logit_rows` of the flat batch.

        Each token of the flat batch has its position and its cache slot. The batch starts
        with the newest token of each of `decode_count` decoding sequences, in ascending slot
        order; the prefill chunks follow, in `prefills` order. Slots 0..active-1 are in use.
        """
        total = tokens.shape[0]
        decode_slots = slots[:decode_count]
        hq, hk, d = self.num_heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        decode_bias, longest, dense = None, 0, decode_count == active
        if decode_count:
            # Every active slot takes part in the decode attention; rows of slots that are
            # still prefilling see one position only and their output is dropped.
            seen = torch.ones(active, dtype=torch.long, device=self.device)
            seen[decode_slots] = positions[:decode_count] + 1   # positions held after this step
            longest = key_length(int(seen.max()))
            hidden = torch.arange(longest, device=self.device)[None, :] >= seen[:, None]
            decode_bias = torch.zeros(active, 1, 1, longest, device=self.device).masked_fill_(
                hidden.view(active, 1, 1, longest), float("-inf"))
        prefill_biases = [self._causal_bias(c) for c in prefills]
        k_index, v_index = self._write_indices(slots, positions)
        x = F.embedding(tokens, self.embed)
        for index, layer in enumerate(self.layers):
            h = self._rms(x, layer.ln1)
            qkv = linear(h, layer.wqkv, layer.bqkv)
            qk = self._rope(qkv[:, :(hq + hk) * d].view(total, hq + hk, d), cos, sin)   # q and k at once
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, (hq + hk) * d:].view(total, hk, d)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            k_cache.view(-1).index_copy_(0, k_index, k.reshape(-1))
            v_cache.view(-1).index_copy_(0, v_index, v.reshape(-1))
            out = torch.empty_like(q)
            if decode_count:
                if dense:
                    qd = q[:decode_count].unsqueeze(2)
                else:
                    qd = q.new_zeros(active, hq, 1, d)
                    qd[decode_slots, :, 0] = q[:decode_count]
                od = self._decode_attention(qd, k_cache[:active, :, :, :longest],
                                            v_cache[:active, :, :longest], decode_bias)
                out[:decode_count] = od.squeeze(2) if dense else od[decode_slots, :, 0]
            offset = decode_count
            for chunk, bias in zip(prefills, prefill_biases, strict=True):
                end = key_length(chunk.start + chunk.length)
                qp = q[offset:offset + chunk.length].transpose(0, 1)          # [hq, c, d]
                op = self._chunk_attention(qp, k_cache[chunk.slot, :, :, :end], v_cache[chunk.slot, :, :end], bias)
                out[offset:offset + chunk.length] = op.transpose(0, 1)
                offset += chunk.length
            x = x + linear(out.view(total, hq * d), layer.wo)
            h = self._rms(x, layer.ln2)
            gate, up = linear(h, layer.w_gate_up).chunk(2, dim=-1)
            x = x + linear(self.act(gate) * up, layer.w_down)
        h = self._rms(x[logit_rows], self.norm)
        return linear(h, self.lm_head).float()
