"""How large a model's KV cache is on a GPU: what a share of the device's memory leaves after its weights."""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

# Device memory a model on a GPU leaves free beyond its weights and KV cache: its CUDA graphs' pool and
# a step's activations (the largest step's logits in float32, its products' outputs). 2 GiB holds them for
# 256 rows of a 128k vocabulary.
GPU_RESERVE_BYTES = 2 << 30


def gpu_kv_tokens(free: int, total: int, fraction: float, per_token: int, reserve: int = GPU_RESERVE_BYTES) -> int:
    """KV cache positions a model's pool may hold on a GPU with `free` of `total` bytes free after its
    weights: what the share `fraction` of the device leaves, less `reserve`, in positions of
    `per_token` bytes (0 when nothing is left)."""
    budget = int(fraction * total) - (total - free) - reserve
    return max(0, budget // per_token)


def share_bytes(free: int, total: int, fraction: float) -> int:
    """Bytes of a GPU with `free` of `total` bytes free that the share `fraction` of it leaves to one
    more model (what others hold counts against the share): what its lease asks for."""
    return max(0, int(free - (1 - fraction) * total))


def _free_and_total(device: torch.device) -> tuple[int, int]:
    """The GPU's free and total bytes now, what no tensor holds any longer given back to it first."""
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)


def gpu_share(device: torch.device, fraction: float) -> int:
    """`share_bytes` of `device` now (0 off a GPU, or without a fraction)."""
    if device.type != "cuda" or fraction <= 0:
        return 0
    return share_bytes(*_free_and_total(device), fraction)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes one position of the KV cache takes: keys and values of every layer's KV heads."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * kv_heads * head_dim * 2 * torch.empty((), dtype=dtype).element_size()


def fitted_kv_tokens(device: torch.device, kv_tokens: int, fraction: float, per_token: int) -> int:
    """`kv_tokens`, or on a GPU with a `fraction` more: as many positions as that share of the device
    leaves now (the weights in place; what no tensor holds any longer given back to the device first)."""
    if device.type != "cuda" or fraction <= 0:
        return kv_tokens
    free, total = _free_and_total(device)
    fitted = gpu_kv_tokens(free, total, fraction, per_token)
    log.info("%.1f of %.1f GiB free on %s after the weights: %d KV positions fill %.0f%% of it",
             free / 2**30, total / 2**30, device, fitted, fraction * 100)
    return max(kv_tokens, fitted)
