"""CUDA graphs of the lean forward's decode steps.

A step of decoding sequences only is the same few hundred kernels every time; launched one by one from
Python they cost more than they compute on a GPU. At load, the runner's forward is captured once per
batch bucket (`BUCKETS`, up to the most sequences a step runs) over static buffers: each row's token,
position, slot, the positions it sees, and its block table (as wide as the longest sequence's). A
step of n decoding rows then copies its inputs into those buffers (two copies to the device) and
replays the graph of the smallest bucket that holds n; the rows past n are padding, which reads
nothing and writes its keys and values into the cache's scratch block (`PagedCache(spare=True)`).

Prompt chunks, steps with LoRA adapters and steps of more rows than the largest bucket run eagerly.
The graphs share one memory pool (captured largest first); its size is part of the runner's bytes.
On the CPU under Triton's interpreter (the tests) the same buffers are filled and the forward runs
over them as it would be captured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from .attention import BLOCK, Step, blocks_for

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


class _StaticStep:
    """What the forward reads of a `Step`, over the graphs' static buffers, for `rows` rows all decoding."""

    prefills: tuple = ()

    def __init__(self, rows: int, positions: torch.Tensor, slots: torch.Tensor, seen: torch.Tensor,
                 tables: torch.Tensor, which: torch.Tensor) -> None:
        self.decode_count = rows
        self.positions, self.slots = positions[:rows], slots[:rows]
        self._rows = (tables[:rows], which[:rows], seen[:rows])

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._rows


class DecodeGraphs:
    """The decode steps of `runner` (a `llama.LlamaRunner` on CUDA whose parts all have kernels) as
    CUDA graphs, one per bucket of at most `max_rows` rows, captured now."""

    def __init__(self, runner: Any, max_rows: int = BUCKETS[-1]) -> None:
        cache = runner.cache
        if cache.scratch is None:
            raise ValueError("CUDA graphs need a cache with a scratch block")
        # (No reference to the runner is kept: it holds these graphs, and a cycle would keep the model's
        # device memory until the collector ran.)
        largest = max(1, min(max_rows, BUCKETS[-1]))
        self.buckets = [b for b in BUCKETS if b < largest] + [largest]
        top = self.buckets[-1]
        self.width = blocks_for(runner.max_len)
        device = runner.device
        # Inputs: positions, slots and seen [3, top], then the block tables [top, width], all int32, in
        # pinned memory filled by the host and copied to their twins on the device before each replay.
        self.device = device
        self.cuda = device.type == "cuda"
        self._host_head = self._pinned(torch.zeros(3, top, dtype=torch.int32))
        self._host_tables = self._pinned(torch.zeros(top, self.width, dtype=torch.int32))
        self._head = torch.zeros(3, top, dtype=torch.int32, device=device)
        self._tables = torch.zeros(top, self.width, dtype=torch.int32, device=device)
        self._which = torch.arange(top, dtype=torch.int32, device=device)
        self._tokens = torch.zeros(top, dtype=torch.long, device=device)
        self._copied = torch.cuda.Event() if self.cuda else None
        self._scratch_slot = cache.scratch * BLOCK
        self._pad(0, top)
        self._head.copy_(self._host_head)
        self._tables.copy_(self._host_tables)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.bytes = 0
        self.replays = 0            # steps run through the graphs
        if self.cuda:
            self._capture(runner.layers_forward)

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in page-locked memory (copied to the GPU without a wait), on CUDA."""
        return tensor.pin_memory() if self.cuda else tensor

    @property
    def largest(self) -> int:
        return self.buckets[-1]

    def _pad(self, start: int, end: int) -> None:
        """Rows start..end of the host buffers as padding: position 0, the scratch slot, one position
        seen, in the scratch block."""
        head = self._host_head.numpy()
        head[0, start:end] = 0
        head[1, start:end] = self._scratch_slot
        head[2, start:end] = 1
        self._host_tables.numpy()[start:end, 0] = self._scratch_slot // BLOCK

    def _step(self, rows: int) -> _StaticStep:
        head = self._head
        return _StaticStep(rows, head[0], head[1], head[2], self._tables, self._which)

    def _capture(self, forward: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
        """Captures `forward` (the runner's, every row's logits) once per bucket, largest first."""
        started = time.monotonic()
        device = self.device
        before = torch.cuda.memory_reserved(device)
        pool = None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):          # warm every bucket first: Triton's kernels compile, cuBLAS plans
            for rows in self.buckets:
                forward(self._tokens[:rows], self._step(rows))
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        for rows in sorted(self.buckets, reverse=True):
            graph = torch.cuda.CUDAGraph()
            # Thread-local: other threads' CUDA calls (a pooling model's batch) neither spoil the capture nor fail.
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                logits = forward(self._tokens[:rows], self._step(rows))
            pool = graph.pool()
            self._graphs[rows] = (graph, logits)
        torch.cuda.synchronize(device)
        self.bytes = torch.cuda.memory_reserved(device) - before
        log.info("captured %d CUDA graphs of decode steps (up to %d rows) in %.1fs, %d MiB", len(self._graphs),
                 self.largest, time.monotonic() - started, self.bytes >> 20)

    def fits(self, step: Step) -> bool:
        """Whether a graph runs `step`: decoding rows only, no more than the largest bucket."""
        return not step.prefills and 0 < step.decode_count <= self.largest

    def run(self, tokens: torch.Tensor, step: Step,
            forward: Callable[[torch.Tensor, Any], torch.Tensor]) -> torch.Tensor:
        """The logits [n, vocab] (the model's dtype) of the n decoding rows of `step` (their tokens `tokens` [n], on
        the device), by replaying the graph of the smallest bucket that holds n (on the CPU, calling
        `forward`, the runner's, over the same buffers). The tensor is the graph's own: read it before
        the next step."""
        parts = step.decoding
        n = len(parts)
        rows = next(b for b in self.buckets if b >= n)
        self.replays += 1
        if self._copied is not None:
            self._copied.synchronize()        # the last step's copies have left the host buffers
        head = self._host_head.numpy()
        tables = self._host_tables.numpy()
        for i, part in enumerate(parts):
            position = part.start
            held = blocks_for(position + 1)
            head[0, i] = position
            head[1, i] = part.blocks[position // BLOCK] * BLOCK + position % BLOCK
            head[2, i] = position + 1
            tables[i, :held] = part.blocks[:held]
        if n < rows:
            self._pad(n, rows)
        self._tokens[:n].copy_(tokens[:n])
        # Whole rows, contiguous on both sides (a strided copy would go through pageable memory).
        self._head.copy_(self._host_head, non_blocking=True)
        self._tables[:rows].copy_(self._host_tables[:rows], non_blocking=True)
        if not self.cuda:       # the same buffers, run as they would be captured (Triton's interpreter)
            return forward(self._tokens[:rows], self._step(rows))[:n]
        self._copied.record(torch.cuda.current_stream(self.device))
        graph, logits = self._graphs[rows]
        graph.replay()
        return logits[:n]
