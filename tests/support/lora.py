"""LoRA adapters for the tests, made by PEFT itself, and PEFT's greedy answers to compare with."""

from __future__ import annotations

from pathlib import Path

# Every projection the engine adapts.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(model, directory: Path, seed: int, **config) -> Path:
    """A random LoRA adapter of `model` (B not zero, so it changes the answers) saved by PEFT's
    `save_pretrained` into `directory`; `model` is left as it was."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    options = dict(r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS, init_lora_weights=False) | config
    peft_model = get_peft_model(model, LoraConfig(**options))
    peft_model.save_pretrained(directory)
    peft_model.unload()
    return directory


def adapter_of(base_dir: Path, directory: Path, seed: int, **config) -> Path:
    """`save_adapter` for the model in `base_dir`, loaded in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return save_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), directory, seed,
                        **config)


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: str, max_new_tokens: int) -> list[int]:
    """The `max_new_tokens` token ids `generate()` of the base model (with the PEFT adapter in
    `adapter_dir`, if any) answers `prompt` with, greedy, in float32, past any end-of-sequence."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None           # as a request with ignore_eos
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = AutoTokenizer.from_pretrained(base_dir)(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()
