"""Embeddings through llmos against sentence-transformers' `encode()`, on the same model in the same
process and minute: the whole suite in this process (real gRPC servers, the registry's import,
the scheduler's admission, the worker's batcher), `Embed` calls of `--batch` texts, `--concurrency`
at a time, each concurrency just after `SentenceTransformer(model).encode(texts, batch_size=--batch)`
of the same texts.

    python -m benchmarks.embeddings [--layers 6 --hidden 384] [--batch 64] [--inputs 1024]
                                    [--concurrency 1 4] [--rounds 2]

The model is a random BERT of all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads; no model
hub here) with sentence-transformers' files (mean pooling, normalized), and the test's small
WordPiece vocabulary: the layers are MiniLM's, the embedding table is smaller. Texts: sentences
of 8 to 60 words. Printed: inputs per second each way (median over the rounds) and the ratio,
and the largest difference between the two's vectors.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("the capital of france is paris and the capital of italy is rome once upon a time there was a small "
         "model that answered questions llmos streams tokens from workers through the gateway to every client "
         "numbers accents travel in utf").split()


def build(directory: Path, layers: int, hidden: int) -> Path:
    from transformers import BertConfig, BertModel

    from tests.support.tiny_encoders import build_bert_tokenizer, sentence_transformers_files

    tokenizer = build_bert_tokenizer(directory)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(directory)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                        num_hidden_layers=layers, num_attention_heads=hidden // 32, max_position_embeddings=512,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    sentence_transformers_files(directory, "mean")
    return directory


async def through_llmos(data_dir: Path, model_dir: Path, texts: list[str], batch: int, concurrency: int,
                        rounds: int, reference: torch.Tensor) -> tuple[list[float], float]:
    """Inputs per second of each round, and the largest difference from `reference`'s vectors."""
    from llmos.v1 import gateway_pb2, gateway_pb2_grpc, registry_pb2, registry_pb2_grpc
    from tests.support.inprocess import start_in_process

    suite = await start_in_process(data_dir, {
        "registry": {"allowed_roots": (str(model_dir.parent),)},
        "scheduler": {"slots_per_worker": 64, "max_queue": 1024},
        "monitor": {"probe_interval_seconds": 0}})
    rates, worst = [], 0.0
    try:
        registry = registry_pb2_grpc.RegistryServiceStub(suite.channel("registry"))
        gateway = gateway_pb2_grpc.GatewayServiceStub(suite.channel("gateway"))
        await registry.ImportModel(registry_pb2.ImportModelRequest(name="minilm", source=str(model_dir)))
        await registry.LoadModel(registry_pb2.LoadModelRequest(name="minilm"))
        batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]
        gate = asyncio.Semaphore(concurrency)

        async def one(chunk: list[str]) -> list[list[float]]:
            async with gate:
                answer = await gateway.Embed(gateway_pb2.EmbedRequest(model="minilm", inputs=chunk))
            return [list(v.values) for v in answer.embeddings]

        await one(batches[0])                                  # warm
        for _ in range(rounds):
            started = time.perf_counter()
            vectors = [v for part in await asyncio.gather(*(one(b) for b in batches)) for v in part]
            rates.append(len(texts) / (time.perf_counter() - started))
            worst = max(worst, float((torch.tensor(vectors) - reference).abs().max()))
    finally:
        await suite.stop()
    return rates, worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60))) for _ in range(args.inputs)]
    with tempfile.TemporaryDirectory(prefix="llmos-bench-embed-") as tmp:
        model_dir = build(Path(tmp) / "models" / "minilm", args.layers, args.hidden)
        st = SentenceTransformer(str(model_dir), device="cpu")
        st.encode(texts[:args.batch], batch_size=args.batch)          # warm
        print(f"random BERT, {args.layers} layers, hidden {args.hidden}; {args.inputs} texts of 8 to 60 words, "
              f"batches of {args.batch}; torch threads {torch.get_num_threads()}")
        reference, st_rates, st_each = None, [], []
        for concurrency in args.concurrency:
            for _ in range(args.rounds):
                started = time.perf_counter()
                reference = torch.tensor(st.encode(texts, batch_size=args.batch))
                st_rates.append(len(texts) / (time.perf_counter() - started))
                started = time.perf_counter()            # each request's texts alone, as a server gets them
                for i in range(0, len(texts), args.batch):
                    st.encode(texts[i:i + args.batch], batch_size=args.batch)
                st_each.append(len(texts) / (time.perf_counter() - started))
            ours, worst = asyncio.run(through_llmos(Path(tmp) / f"data-{concurrency}", model_dir, texts,
                                                    args.batch, concurrency, args.rounds, reference))
            mine, theirs = statistics.median(ours), statistics.median(st_rates[-args.rounds:])
            each = statistics.median(st_each[-args.rounds:])
            print(f"  concurrency {concurrency}: llmos Embed {mine:7.1f} inputs/s | sentence-transformers encode(): "
                  f"all texts {theirs:7.1f} inputs/s ({mine / theirs:.2f}x), each batch of {args.batch} alone "
                  f"{each:7.1f} ({mine / each:.2f}x) | largest difference {worst:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
