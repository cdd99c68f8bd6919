"""The KV cache a model gets on a GPU: what `gpu_memory_fraction` of the device leaves after its weights."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from llmos.engine.memory import GPU_RESERVE_BYTES, gpu_kv_tokens, kv_bytes_per_token, share_bytes

GIB = 1 << 30


def test_a_llama_1b_shape_takes_32_kib_a_position_in_bf16():
    config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64)
    assert kv_bytes_per_token(config, torch.bfloat16) == 16 * 8 * 64 * 2 * 2
    assert kv_bytes_per_token(config, torch.float32) == 16 * 8 * 64 * 2 * 4
    # Without KV heads or a head size named: all heads, hidden / heads each.
    assert kv_bytes_per_token(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=None), torch.float32) == 2 * 4 * 16 * 2 * 4


def test_the_share_left_after_the_weights_and_the_reserve_becomes_positions():
    total, weights = 80 * GIB, 3 * GIB
    per = 32 * 1024
    # 90% of 80 GiB, less the 3 GiB the weights took and the 2 GiB reserve: 67 GiB of positions.
    assert gpu_kv_tokens(total - weights, total, 0.9, per) == (int(0.9 * total) - weights - GPU_RESERVE_BYTES) // per
    # Memory other processes hold counts against the share too.
    assert gpu_kv_tokens(total - weights - 10 * GIB, total, 0.9, per) == (
        int(0.9 * total) - weights - 10 * GIB - GPU_RESERVE_BYTES) // per
    # A share the weights already fill leaves none (the worker's kv_cache_tokens is then the cache).
    assert gpu_kv_tokens(total - weights, total, 0.05, per) == 0


def test_a_models_lease_is_what_the_share_leaves_free_of_the_device():
    total = 80 * GIB
    # An empty device: 90% of it.
    assert share_bytes(total, total, 0.9) == int(0.9 * total)
    # 30 GiB held (by another model or process): the share less those.
    assert share_bytes(total - 30 * GIB, total, 0.9) == int(0.9 * total) - 30 * GIB
    # More held than the share: nothing (the worker then leases the registry's estimate).
    assert share_bytes(5 * GIB, total, 0.9) == 0
    # The cache sized after the weights stays within the lease: weights + cache + reserve = the share.
    weights, per = 3 * GIB, 32 * 1024
    cache = gpu_kv_tokens(total - weights, total, 0.9, per) * per
    assert weights + cache + GPU_RESERVE_BYTES <= share_bytes(total, total, 0.9)
