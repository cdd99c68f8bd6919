"""Converts a GGUF file into a safetensors model directory, once, at import.

Run as a child process (`python -m llmos.registry.gguf_convert SRC DEST`) so the
registry itself never imports torch. transformers dequantizes the GGUF tensors;
the GGUF quantizer state is dropped before saving, since the weights are then
plain tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path


def convert(source: Path, destination: Path, dtype: str = "bfloat16") -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, filename = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename,
                                                 dtype=getattr(torch, dtype))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m llmos.registry.gguf_convert SOURCE.gguf DEST_DIR")
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
