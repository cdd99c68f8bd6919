"""Builds the tiny random Llama used by fast tests: a few layers, a small BPE tokenizer.

Everything is made here, deterministically, from a fixed seed and a fixed corpus;
nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a small model that answered questions.",
    "Café, naïve, déjà vu, jalapeño: accents travel in UTF-8.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji too: 🙂 🚀 🌍 and numbers 0123456789.",
    "llmos streams tokens from workers through the gateway to every client.",
] * 20

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_tiny_model(directory: Path, seed: int = 0, context: int = 256) -> Path:
    """Writes config, safetensors weights and tokenizer of a tiny random Llama into `directory`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


# Tiny random configs of other architectures (the generic forward's tests): what each family
# does differently is kept (Gemma 2's sliding window, soft-capping and scaled queries, Phi-3's
# fused projections, GPT-2's Conv1D and learned positions, GPT-NeoX's partial rotary, OPT's
# offset positions), the sizes are shrunk.
def _configs(vocab: int, context: int, ids: dict) -> dict:
    from transformers import Gemma2Config, GemmaConfig, GPT2Config, GPTNeoXConfig, OPTConfig, Phi3Config, Qwen3Config

    small = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=context, **ids)
    return {
        "qwen3": lambda: Qwen3Config(**small, num_key_value_heads=2, head_dim=16),
        "gemma2": lambda: Gemma2Config(**small, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                       query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                       final_logit_softcapping=3.0),
        "gemma": lambda: GemmaConfig(**small, num_key_value_heads=1, head_dim=16),
        "phi3": lambda: Phi3Config(**small, num_key_value_heads=2),
        "gpt2": lambda: GPT2Config(vocab_size=vocab, n_positions=context, n_embd=64, n_layer=2, n_head=4, **ids),
        "gpt_neox": lambda: GPTNeoXConfig(**small, rotary_pct=0.5),
        "opt": lambda: OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=context, word_embed_proj_dim=64,
                                 **ids),
    }


TINY_ARCHITECTURES = ("qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "opt")


def build_tiny_architecture(directory: Path, kind: str, seed: int = 0, context: int = 256) -> Path:
    """Writes a tiny random model of the family `kind` (one of `_configs`) into `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = _configs(len(tokenizer), context, ids)[kind]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if kind == "gemma2":
        # Attention scores large enough for the soft-capping to bend them.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8)
                layer.self_attn.k_proj.weight.mul_(8)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
