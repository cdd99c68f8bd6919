"""Makes the check's models with random weights, in bfloat16, each a safetensors directory with
SmolLM2-135M-Instruct's tokenizer and chat template (from .gpu/model/, `prepare.sh`) beside it:
  smollm2-random  SmolLM2-135M-Instruct's own config (30 layers, hidden 576, 9 heads, 3 KV heads)
  llama1b-random  a Llama-3.2-1B-like shape: hidden 2048, 16 layers, 32 heads, 8 KV heads,
                  intermediate 8192, tied embeddings, SmolLM2's vocabulary (49152)
Usage: python make_models.py OUT_DIR DEVICE [smollm2] [llama1b]
The weights are initialised on DEVICE (fast on a GPU) and written from there."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

HERE = Path(__file__).resolve().parents[2] / ".gpu" / "model"
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "intermediate_size": 8192, "max_position_embeddings": 8192, "vocab_size": 49152,
            "tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "_model_name_or_path": "llama1b-random"}


def make(name: str, overrides: dict, out: Path, device: str) -> None:
    started = time.monotonic()
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    config = json.loads((HERE / "config.json").read_text())
    config.update(overrides)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target), dtype=torch.bfloat16)
    except Exception as exc:  # noqa: BLE001 - the models are what every later step needs: make them on the CPU
        if device == "cpu":
            raise
        print(f"{name}: cannot make it on {device} ({type(exc).__name__}: {exc}); making it on the CPU", flush=True)
        device = "cpu"
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(target), dtype=torch.bfloat16)
    made_on = next(model.parameters()).device
    model.eval().to("cpu")           # written from host memory (a GPU-made model is copied down once)
    model.save_pretrained(target)
    for side in SIDE_FILES:
        shutil.copyfile(HERE / side, target / side)
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in target.iterdir())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    print(f"{name}: {params / 1e6:.0f}M parameters, {size / 2**20:.0f} MiB in {target}, made on {made_on} "
          f"in {time.monotonic() - started:.1f}s", flush=True)


def main() -> int:
    out, device, which = Path(sys.argv[1]), sys.argv[2], sys.argv[3:] or ["smollm2", "llama1b"]
    for name in which:
        make(f"{name}-random", {} if name == "smollm2" else LLAMA_1B, out, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
