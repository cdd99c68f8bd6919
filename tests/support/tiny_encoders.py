"""Tiny random pooling models for fast tests, made here from a fixed seed: a BERT embedder with
sentence-transformers' files (mean pooling, normalized), a BERT sequence classifier (three
labels), a BERT cross-encoder (one label), and a decoder embedder (the tiny Llama with
last-token pooling). Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.tiny_model import CORPUS, build_tiny_model

LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def build_bert_tokenizer(directory: Path):
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(CORPUS, vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    trainer.save_model(str(directory))
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), model_max_length=128)
    tokenizer.save_pretrained(directory)
    return tokenizer


def sentence_transformers_files(directory: Path, pooling: str, normalize: bool = True) -> None:
    """modules.json and 1_Pooling/config.json as sentence-transformers writes them."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_lasttoken": pooling == "last"}))


def build_tiny_bert(directory: Path, kind: str, seed: int = 0) -> Path:
    """kind: "embed", "classify" or "score"."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tokenizer = build_bert_tokenizer(directory)
    extra = {}
    if kind == "classify":
        extra = {"num_labels": 3, "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    elif kind == "score":
        extra = {"num_labels": 1}
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        **extra)
    if kind == "embed":
        config.matryoshka_dimensions = [32, 16]
    torch.manual_seed(seed)
    model = (BertModel if kind == "embed" else BertForSequenceClassification)(config)
    model.save_pretrained(directory, safe_serialization=True)
    if kind == "embed":
        sentence_transformers_files(directory, "mean")
    return directory


def build_decoder_embedder(directory: Path) -> Path:
    """The tiny Llama with sentence-transformers' files saying: last-token pooling, normalized."""
    build_tiny_model(directory)
    sentence_transformers_files(directory, "last")
    return directory
