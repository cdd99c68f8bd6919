"""Converts model weights to a safetensors model directory, once, at import.

Run as a child process (`python -m llmos.registry.to_safetensors gguf|pickle SOURCE DEST`) so the
registry itself never imports torch, and never unpickles anything in its own process.
- gguf: transformers dequantizes the GGUF tensors; the GGUF quantizer state is dropped before
  saving, since the weights are then plain tensors.
- pickle: a transformers directory with `.bin` weights (only when the registry's `allow_pickle`
  setting is on), read with `torch.load(weights_only=True)` and never with remote code.
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(kind: str, source: Path, destination: Path, dtype: str = "bfloat16") -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
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
