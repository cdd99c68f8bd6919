"""LoRA adapters on the lean forward: sequences of different adapters, and of the base model, in
one step, each row through its own adapter (the per-row products of Punica and S-LoRA).

An adapted projection computes `W x + scaling * B (A x)`. The base product `W x` runs over every
row of the step as before; the adapters' part is added after it, for all the step's adapters at
once. Per fused product of a layer (q/k/v, o, gate/up, down) each adapter's A^T of its
projections sits side by side in one [in, R] block and its B^T in one [R, out] block, each B in
its projection's output columns (zeros elsewhere), and the step's adapters' blocks are stacked
side by side. A step of few rows (decoding, up to `MASKED_ROWS`) multiplies every row by all of
them and keeps each row's own adapter's part (a mask of scalings, zero elsewhere):

    xa = x @ A_all * mask       [rows, adapters x R]
    y += xa @ B_all             [rows, out]

three operations per fused product; on the engine's thread they cost half what gathering does at
16 rows. A step of many rows (a prefill) gathers each adapter's rows into a group of their own,
so each row pays for its own adapter only (Punica's batched gather-matmul):

    xg = x[groups]              [adapters, rows, in]
    xa = xg @ A_stack * scale   [adapters, rows, R]
    y[groups] += xa @ B_stack   [adapters, rows, out]

A row of the base model has a mask of zeros, or is in no group (or in one only as padding, at
scale 0): zero is added to it, and its output is the base forward's, bit for bit. A step with no adapter runs none
of this.

Stacks are built for a set of adapters the first time a step holds that set and kept for the
next steps (the set changes only when a sequence of a new adapter joins, the last of one leaves,
or adapters take turns), `STACKS_KEPT` sets at a time; they are copies, so a set costs about
its adapters' bytes again (`AdapterStacks.nbytes`), and more: each B block spans every output
column of its fused product, and a fused product's blocks are padded to its widest adapter.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmos.common.adapters import WEIGHTS, AdapterFacts, parse_key
from llmos.common.errors import FailedPrecondition

# The fused products of a decoder layer and the projections in each, in their column order.
KINDS: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                                     "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
# Steps of at most this many rows multiply every row by every adapter of the step (masked); more
# rows are gathered by adapter first.
MASKED_ROWS = 64
# Sets of adapters whose stacks are kept.
STACKS_KEPT = 2

_uids = itertools.count(1)


@dataclass(eq=False)
class Adapter:
    """A LoRA adapter loaded for one runner: per base layer, each adapted projection's A [r, in]
    and B [out, r] on the runner's device, in its dtype."""

    name: str
    facts: AdapterFacts
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]
    # Unique per load: what the prefix cache keys an adapter's keys and values by.
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def scaling(self) -> float:
        return self.facts.scaling

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors as loaded (on the runner's device, in its dtype)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for pair in layer.values() for t in pair)


@dataclass(frozen=True)
class LoraBatch:
    """The adapters of one step and, for each row of its flat batch, the index of the row's
    adapter in `adapters` (-1: the base model)."""

    adapters: tuple[Adapter, ...]
    rows: list[int]


def _refuse(name: str, message: str, reason: str, **metadata: str) -> FailedPrecondition:
    return FailedPrecondition(message, reason=reason, metadata={"adapter": name, **metadata})


def require_adapters(runner: Any, adapter: str, model: str = "") -> None:
    """Refuses (FAILED_PRECONDITION ADAPTERS_NOT_SUPPORTED) an adapter on a runner that takes none."""
    if not getattr(runner, "supports_adapters", False):
        raise _refuse(adapter, f"{f'model {model}' if model else 'the model'} runs on the {runner.implementation} "
                      f"forward, which takes no LoRA adapters ({adapter})", "ADAPTERS_NOT_SUPPORTED",
                      implementation=runner.implementation)


def load_adapter(name: str, directory: Path, runner: Any, facts: AdapterFacts) -> Adapter:
    """Loads the adapter in `directory` (checked by `read_adapter` into `facts`) for `runner`:
    its tensors onto the runner's device in the runner's dtype. Call it on the engine driver's
    thread, as every torch call of the worker. Raises FailedPrecondition when the runner takes
    no adapters (ADAPTERS_NOT_SUPPORTED) or the weights no longer fit what `facts` says."""
    from safetensors.torch import load_file

    require_adapters(runner, name)
    shapes: dict[str, tuple[int, int]] = runner.module_shapes
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key_name, tensor in load_file(Path(directory) / WEIGHTS, device="cpu").items():
        key = parse_key(key_name)
        if key is not None and key.layer < runner.layer_count:
            features_in, features_out = shapes[key.module]
            expected = (facts.rank, features_in) if key.part == "A" else (features_out, facts.rank)
            if tuple(tensor.shape) == expected:
                parts.setdefault((key.layer, key.module), {})[key.part] = tensor
                continue
        raise _refuse(name, f"tensor {key_name} of adapter {name} changed since it was read: it does not fit "
                      "the base model", "ADAPTER_BASE_MISMATCH", tensor=key_name)
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(runner.layer_count)]
    with torch.no_grad():
        for (layer, module), pair in parts.items():
            if set(pair) != {"A", "B"}:
                raise _refuse(name, f"adapter {name} changed since it was read: layer {layer} {module} lacks "
                              "one of lora_A and lora_B", "ADAPTER_BASE_MISMATCH")
            layers[layer][module] = tuple(pair[p].to(runner.device, runner.dtype).contiguous() for p in "AB")
    return Adapter(name, facts, layers)


class _Stack:
    """The stacked A and B of one set of adapters, per layer and fused product: for each fused
    product, the adapters adapting any of its projections (`members`), each one's A^T [in, R] and
    B^T [R, out] (its projections' blocks side by side, zero-padded to the widest R)."""

    def __init__(self, adapters: tuple[Adapter, ...], shapes: dict[str, tuple[int, int]], layer_count: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.adapters = adapters
        self.members: dict[str, tuple[int, ...]] = {}
        self.weights: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(layer_count)]
        for kind, modules in KINDS.items():
            starts = dict(zip(modules, itertools.accumulate((shapes[m][1] for m in modules), initial=0), strict=False))
            width = sum(shapes[m][1] for m in modules)
            targets = {j: [m for m in modules if m in a.facts.target_modules] for j, a in enumerate(adapters)}
            members = tuple(j for j in targets if targets[j])
            if not members:
                continue
            self.members[kind] = members
            columns = max(adapters[j].facts.rank * len(targets[j]) for j in members)
            features_in = shapes[modules[0]][0]
            for layer in range(layer_count):
                if not any(m in adapters[j].layers[layer] for j in members for m in targets[j]):
                    continue
                a_stack = torch.zeros(len(members), features_in, columns, device=device, dtype=dtype)
                b_stack = torch.zeros(len(members), columns, width, device=device, dtype=dtype)
                for q, j in enumerate(members):
                    rank, column = adapters[j].facts.rank, 0
                    for module in targets[j]:
                        pair = adapters[j].layers[layer].get(module)
                        if pair is not None:
                            a, b = pair
                            a_stack[q, :, column:column + rank] = a.T
                            b_stack[q, column:column + rank, starts[module]:starts[module] + b.shape[0]] = b.T
                        column += rank
                # Kept side by side, [in, members x columns] and [members x columns, out]: a step of
                # few rows multiplies them whole (`LoraStep`); the gathered form reads them as views.
                self.weights[layer][kind] = (a_stack.permute(1, 0, 2).reshape(features_in, -1).contiguous(),
                                             b_stack.reshape(-1, width))


class LoraStep:
    """One step's adapter products: `add` puts each row's adapter part onto a fused product.

    A step of few rows (decoding) multiplies every row by all the step's adapters' blocks side
    by side and scales each row's part by its adapter's scaling in its own adapter's columns and
    by zero elsewhere: three products per fused product. A step of many rows (a prefill) gathers
    the rows of each adapter into a group of their own (groups padded to the largest with row 0
    at scaling 0), and multiplies each group by its own adapter's A and B in one batched
    product: no row pays for another's adapter. Either way a base row gets exact zeros added."""

    def __init__(self, stack: _Stack, rows: list[int], device: torch.device, dtype: torch.dtype) -> None:
        self.weights = stack.weights
        # Few rows (decoding): every row through every adapter's blocks at once, each row's
        # part outside its own adapter's columns scaled by zero (three products in all, fewer
        # and cheaper than gathering); many rows (prefill): the rows gathered by adapter.
        self.masks: dict[str, torch.Tensor] | None = None
        if len(rows) <= MASKED_ROWS:
            self.masks = {}
            masks: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}
            for kind, members in stack.members.items():
                columns = self.weights_columns(kind, len(members))
                if (members, columns) not in masks:
                    adapted = [(row, members.index(a), stack.adapters[a].scaling)
                               for row, a in enumerate(rows) if a in members]
                    scales = torch.zeros(len(rows), len(members), dtype=dtype)
                    if adapted:
                        where, member, scale = zip(*adapted, strict=True)
                        scales[list(where), list(member)] = torch.tensor(scale, dtype=dtype)
                    masks[members, columns] = scales.repeat_interleave(columns, dim=1).to(device)
                self.masks[kind] = masks[members, columns]
            return
        groups: dict[int, list[int]] = {}
        for row, adapter in enumerate(rows):
            if adapter >= 0:
                groups.setdefault(adapter, []).append(row)
        by_members: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self.groups: dict[str, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        for kind, members in stack.members.items():
            if members not in by_members:
                size = max(len(groups.get(j, ())) for j in members)
                index = [row for j in members for row in groups.get(j, []) + [0] * (size - len(groups.get(j, [])))]
                scales = [stack.adapters[j].scaling if i < len(groups.get(j, ())) else 0.0
                          for j in members for i in range(size)]
                by_members[members] = (torch.tensor(index, dtype=torch.long, device=device),
                                       torch.tensor(scales, dtype=dtype, device=device).view(len(members), size, 1),
                                       len(members), size)
            self.groups[kind] = by_members[members]

    def weights_columns(self, kind: str, members: int) -> int:
        """Columns of each member's block in the kind's stacks (the widest member's)."""
        pair = next(layer[kind] for layer in self.weights if kind in layer)
        return pair[0].shape[1] // members

    def add(self, layer: int, kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Adds to `y` = the fused product `kind` of layer `layer` over the rows `x` what each
        row's adapter adds to it (in place)."""
        pair = self.weights[layer].get(kind)
        if pair is None:
            return
        if self.masks is not None:
            xa = torch.mm(x, pair[0])
            xa.mul_(self.masks[kind])
            y.addmm_(xa, pair[1])
            return
        index, scales, count, size = self.groups[kind]
        if size == 0:
            return
        features_in, columns = x.shape[-1], pair[0].shape[1] // count
        a_stack = pair[0].view(features_in, count, columns).permute(1, 0, 2)
        xa = torch.bmm(x.index_select(0, index).view(count, size, features_in), a_stack)
        xa.mul_(scales)
        y.index_add_(0, index, torch.bmm(xa, pair[1].view(count, columns, -1)).view(count * size, y.shape[-1]))


class AdapterStacks:
    """A runner's stacks of the sets of adapters its recent steps held."""

    def __init__(self, shapes: dict[str, tuple[int, int]], layer_count: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.shapes, self.layer_count, self.device, self.dtype = shapes, layer_count, device, dtype
        self._kept: OrderedDict[tuple[int, ...], _Stack] = OrderedDict()

    def step(self, batch: LoraBatch) -> LoraStep:
        key = tuple(a.uid for a in batch.adapters)
        stack = self._kept.get(key)
        if stack is None:
            stack = _Stack(batch.adapters, self.shapes, self.layer_count, self.device, self.dtype)
            self._kept[key] = stack
            while len(self._kept) > STACKS_KEPT:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(key)
        return LoraStep(stack, batch.rows, self.device, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stacks kept."""
        return sum(t.numel() * t.element_size() for s in self._kept.values() for layer in s.weights
                   for pair in layer.values() for t in pair)

    def forget(self, adapter: Adapter) -> None:
        """Drops the stacks holding `adapter` (it is being unloaded)."""
        for key in [k for k in self._kept if adapter.uid in k]:
            del self._kept[key]
