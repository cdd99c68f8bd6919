"""LoRA adapters on the lean forward: sequences of different adapters, and of the base model, in
one step, each row through its own adapter (the per-row products of Punica and S-LoRA).

An adapted projection computes `W x + scaling * B (A x)`. The base product `W x` runs over every
row of the step as before; the adapters' part is added after it, for all the step's adapters at
once. Per fused product of a layer (q/k/v, o, gate/up, down) the A matrices of the step's
adapters are stacked into one [columns, in] matrix and the B matrices, transposed, into one
[columns, out] matrix, each adapter's B in its projection's output columns (zeros elsewhere). A
step then costs three products per fused product whatever the number of adapters:

    xa = x @ A_stack.T          every row against every adapter's A (a few dozen columns)
    xa *= mask                  [rows, columns]: the row's adapter's scaling in its columns, else 0
    y += xa @ B_stack           the row's own adapter's B (A x), scaled

A row of the base model has an all-zero mask, so zero is added to it: its output is the base
forward's, bit for bit. A step with no adapter runs none of this. Stacks are built for a set of
adapters the first time a step holds that set and kept for the next steps (the set changes only
when a sequence of a new adapter joins or the last of one leaves), a few sets at a time.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmos.common.adapters import WEIGHTS, AdapterFacts, parse_key
from llmos.common.errors import FailedPrecondition

# The fused products of a decoder layer and the projections in each, in their column order.
KINDS: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                                     "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
# Sets of adapters whose stacks are kept.
STACKS_KEPT = 8

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
    rows: torch.Tensor


def _refuse(name: str, message: str, reason: str, **metadata: str) -> FailedPrecondition:
    return FailedPrecondition(message, reason=reason, metadata={"adapter": name, **metadata})


def load_adapter(name: str, directory: Path, runner: Any, facts: AdapterFacts) -> Adapter:
    """Loads the adapter in `directory` (checked by `read_adapter` into `facts`) for `runner`:
    its tensors onto the runner's device in the runner's dtype. Call it on the engine driver's
    thread, as every torch call of the worker. Raises FailedPrecondition when the runner takes
    no adapters (ADAPTERS_NOT_SUPPORTED) or the weights no longer fit what `facts` says."""
    from safetensors.torch import load_file

    if not getattr(runner, "supports_adapters", False):
        raise _refuse(name, f"the {runner.implementation} forward does not run LoRA adapters",
                      "ADAPTERS_NOT_SUPPORTED", implementation=runner.implementation)
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
    """The stacked A and B of one set of adapters, per layer and fused product, and which
    adapter owns each stacked column (the masks are built from that)."""

    def __init__(self, adapters: tuple[Adapter, ...], shapes: dict[str, tuple[int, int]], layer_count: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.adapters = adapters
        self.owners: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.weights: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(layer_count)]
        for kind, modules in KINDS.items():
            starts = dict(zip(modules, itertools.accumulate((shapes[m][1] for m in modules), initial=0), strict=False))
            width = sum(shapes[m][1] for m in modules)
            # (adapter index, module, first column) of each block of `rank` columns.
            blocks = [(j, m) for j, a in enumerate(adapters) for m in modules if m in a.facts.target_modules]
            if not blocks:
                continue
            ranks = [adapters[j].facts.rank for j, _ in blocks]
            columns = sum(ranks)
            self.owners[kind] = torch.tensor([j for (j, _), r in zip(blocks, ranks, strict=True) for _ in range(r)],
                                             device=device)
            self.scales[kind] = torch.tensor([adapters[j].scaling for (j, _), r in zip(blocks, ranks, strict=True)
                                              for _ in range(r)], device=device, dtype=dtype)
            features_in = shapes[modules[0]][0]
            for layer in range(layer_count):
                if not any(m in adapters[j].layers[layer] for j, m in blocks):
                    continue
                a_stack = torch.zeros(columns, features_in, device=device, dtype=dtype)
                b_stack = torch.zeros(columns, width, device=device, dtype=dtype)
                column = 0
                for (j, module), r in zip(blocks, ranks, strict=True):
                    pair = adapters[j].layers[layer].get(module)
                    if pair is not None:
                        a, b = pair
                        a_stack[column:column + r] = a
                        b_stack[column:column + r, starts[module]:starts[module] + b.shape[0]] = b.T
                    column += r
                self.weights[layer][kind] = a_stack, b_stack


class LoraStep:
    """One step's adapter products: `add` puts each row's adapter part onto a fused product."""

    def __init__(self, stack: _Stack, rows: torch.Tensor) -> None:
        self.weights = stack.weights
        zero = torch.zeros((), device=rows.device, dtype=next(iter(stack.scales.values())).dtype)
        self.masks = {kind: torch.where(rows[:, None] == owners[None, :], stack.scales[kind][None, :], zero)
                      for kind, owners in stack.owners.items()}

    def add(self, layer: int, kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Adds to `y` = the fused product `kind` of layer `layer` over the rows `x` what each
        row's adapter adds to it (in place)."""
        pair = self.weights[layer].get(kind)
        if pair is not None:
            xa = F.linear(x, pair[0])
            xa.mul_(self.masks[kind])
            y.addmm_(xa, pair[1])


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
        return LoraStep(stack, batch.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the stacks kept."""
        return sum(t.numel() * t.element_size() for s in self._kept.values() for layer in s.weights
                   for pair in layer.values() for t in pair)

    def forget(self, adapter: Adapter) -> None:
        """Drops the stacks holding `adapter` (it is being unloaded)."""
        for key in [k for k in self._kept if adapter.uid in k]:
            del self._kept[key]
