"""The layers in one native call (`native.llama_layers`, `layer_stack.cpp`): taken in bf16 where every part of a
layer has its kernel, and the same logits, bit for bit, as the runner's loop over the same kernels."""

from __future__ import annotations

import pytest
import torch

from llmos.common.devices import cpu_kind
from llmos.engine import matmul
from llmos.engine.attention import Part, Step, blocks_for, can_compile
from llmos.engine.loader import load_model

CPU = torch.device("cpu")
STACKED_HERE = pytest.mark.skipif(
    cpu_kind() not in ("avx512_bf16", "amx") or not matmul.packs_bf16() or not can_compile(),
    reason="the layers run in one call where the weights are multiplied in pairs: a CPU with avx512_bf16 (AMX's "
           "tiles where it has them), with a C++ compiler")


def steps() -> list[tuple[str, torch.Tensor, list[Part], torch.Tensor]]:
    """One decoding row; 16; prompt chunks of 12, 30 and 7 tokens beside two decoding rows."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for rows in (1, 16):
        per = blocks_for(41)
        parts = [Part(list(range(1 + i * per, 1 + (i + 1) * per)), 40, 1, True) for i in range(rows)]
        cases.append((f"decode {rows}", torch.randint(5, 100, (rows,), generator=generator), parts, torch.arange(rows)))
    parts = [Part([1, 2, 3], 40, 1, True), Part([4, 5], 20, 1, True)]
    first, total, logits = 6, 2, [0, 1]
    for length in (12, 30, 7):
        parts.append(Part(list(range(first, first + blocks_for(length))), 0, length))
        first += blocks_for(length)
        total += length
        logits.append(total - 1)
    cases.append(("mixed", torch.randint(5, 100, (total,), generator=generator), parts, torch.tensor(logits)))
    return cases


def compare(runner) -> None:
    stack = runner.stack
    assert stack is not None, "the layers did not run in one call"
    for label, tokens, parts, logit_rows in steps():
        stacked = runner.forward(tokens, Step(parts, CPU), logit_rows)
        runner.stack = None
        try:
            looped = runner.forward(tokens, Step(parts, CPU), logit_rows)
        finally:
            runner.stack = stack
        assert torch.equal(stacked, looped), label


@STACKED_HERE
def test_the_tiny_models_layers_in_one_call_give_the_loops_logits(tiny_model_dir):
    compare(load_model("m", str(tiny_model_dir), CPU, torch.bfloat16, 2048, 256, compile=True).runner)


@pytest.mark.smollm2
@STACKED_HERE
def test_smollm2s_layers_in_one_call_give_the_loops_logits(smollm2_dir):
    compare(load_model("m", str(smollm2_dir), CPU, torch.bfloat16, 2048, 256, compile=True).runner)


@STACKED_HERE
def test_the_loop_runs_where_a_part_has_no_kernel(tiny_model_dir):
    """Without the attention kernel (compile off), in float32, or with a weight oneDNN multiplies, the
    layers run one call at a time."""
    assert load_model("m", str(tiny_model_dir), CPU, torch.bfloat16, 2048, 256).runner.stack is None
    assert load_model("m", str(tiny_model_dir), CPU, torch.float32, 2048, 256, compile=True).runner.stack is None
    runner = load_model("m", str(tiny_model_dir), CPU, torch.bfloat16, 2048, 256, compile=True).runner
    layer = runner.layers[0]
    layer.wo = matmul.PackedWeight.of(torch.randn(64, 64).bfloat16(), None, matmul.PACKED_BF16_MIN_ROWS)
    assert runner._stack_weights(128) is None
