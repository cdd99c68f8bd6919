"""`llmos bench`: throughput and latency of the running suite against naive baselines.

The workload is N requests at concurrency C with output lengths drawn from a range
(fixed seed) or all the same; EOS is ignored so every request produces exactly its
length. The suite is measured through the gateway, the worker directly, or both.
In the same invocation, on the same model, prompts and dtype, the baselines run in
this process: transformers `generate()` one request at a time, and `generate()` on
static left-padded batches of C (each batch runs until its longest request is done).
Every figure is printed with its ratio to the baselines measured the same minute.

`--peer URL` runs the same workload, in the same invocation, against another server's
OpenAI-compatible `/v1/completions` (vLLM, TGI, llama.cpp, Ollama: streaming, `ignore_eos`)
and prints llmos's figures through the gateway as ratios to the peer's; `--peer-rounds N`
measures both N times, alternating which goes first, and prints the ratios' medians.
`--target openai` measures llmos through its own OpenAI door (the one the data directory's
suite serves, or `--openai URL`) with the client the peer gets: the same client for both.

`--implementations` compares the engine's two forward paths on the model instead, in this
process: the lean Llama-family forward and the model's own transformers code over llmos's
attention (the generic path any architecture takes), alternating, at concurrency 1 and C.

`--conversation N` measures the prefix cache instead: one chat of N turns through the
gateway, each turn sending every earlier one again, then the last turn's messages once
more under a different system prompt (nothing of it cached); it prints the last turn's
time to first token both ways and their ratio, taken the same minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmos.cli.credentials import client_of_args, local_credentials, open_channel
from llmos.cli.launcher import address_file_of
from llmos.common.channels import open_aio_channel
from llmos.common.server import read_http_address
from llmos.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten year old.",
    "List some good habits for writing maintainable software, with a sentence on each.",
    "Describe the water cycle.",
    "What are the main differences between a cat and a dog as pets?",
    "Give me a recipe for a simple tomato soup.",
    "Summarize the plot of a detective novel set in Paris.",
    "Why is the sky blue? Answer in plain words.",
]


@dataclass
class Trace:
    started: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)   # (time, tokens in message)
    # When the stream's first text came, where its first tokens may show none (a special token, such as
    # SmolLM2's <|im_end|> after some raw prompts): the time to first token runs to it, as the HTTP client
    # measures it (it sees only text), so that both doors and the peer are measured alike.
    shown: float | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.arrivals)

    @property
    def ttft(self) -> float:
        return (self.arrivals[0][0] if self.shown is None else self.shown) - self.started

    def gaps(self) -> list[float]:
        out = []
        for (t0, _), (t1, n) in zip(self.arrivals, self.arrivals[1:], strict=False):
            out.extend([(t1 - t0) / n] * n)
        return out


@dataclass(frozen=True)
class Result:
    label: str
    tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def alternating_parser(doc: str) -> argparse.ArgumentParser:
    """The flags of a benchmark that alternates two configurations in rounds through the gateway."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--source", default="bundled:smollm2-135m-instruct",
                        help="what to import: bundled:NAME or a safetensors directory")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    return parser


def workload(n: int, lo: int, hi: int, fixed: bool, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(PROMPTS[i % len(PROMPTS)], hi if fixed else rng.randint(lo, hi)) for i in range(n)]


async def run_suite(label: str, target: str, address: str, model: str, jobs: list[tuple[str, int]],
                    concurrency: int, credentials: tuple[str | None, Path | None] = (None, None),
                    response_format: common_pb2.ResponseFormat | None = None) -> Result:
    key, tls_dir = credentials
    channel = open_aio_channel(address, str(tls_dir) if tls_dir else None, key, public=target == "gateway")
    if target == "gateway":
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    else:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
    queue: asyncio.Queue[tuple[int, str, int]] = asyncio.Queue()
    for i, (prompt, length) in enumerate(jobs):
        queue.put_nowait((i, prompt, length))
    traces: list[Trace] = []
    await channel.channel_ready()           # connected before the clock starts, as the HTTP side is

    async def one(i: int, prompt: str, length: int) -> None:
        sampling = common_pb2.SamplingParams(max_tokens=length, ignore_eos=True, response_format=response_format)
        rid = f"bench-{target}-{i}-{time.monotonic_ns()}"
        if target == "gateway":
            call = stub.Generate(gateway_pb2.GenerateRequest(model=model, prompt=prompt, sampling=sampling,
                                                             request_id=rid))
        else:
            call = stub.GenerateTokens(worker_pb2.GenerateTokensRequest(request_id=rid, model=model, prompt=prompt,
                                                                        sampling=sampling))
        trace = Trace(time.perf_counter())
        async for response in call:
            if response.token_ids:
                trace.arrivals.append((time.perf_counter(), len(response.token_ids)))
                if response.text and trace.shown is None:
                    trace.shown = trace.arrivals[-1][0]
        traces.append(trace)

    async def client() -> None:
        while not queue.empty():
            await one(*queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    await channel.close()
    return Result(label, sum(t.tokens for t in traces), seconds, [t.ttft for t in traces],
                  [g for t in traces for g in t.gaps()])


async def run_peer(url: str, model: str, jobs: list[tuple[str, int]], concurrency: int, key: str = "",
                   label: str = "") -> Result:
    """The workload against an OpenAI-compatible server: streamed completions, EOS ignored; each
    server-sent event's tokens from its text's share of the final usage (an event is a token
    on the peers measured). The client is aiohttp's, as in vLLM's own serving benchmark: httpx's
    costs the bench's loop enough CPU at 64 streams to lower the server's figures on two cores (the
    same door measured 0.90x to 0.94x of its gRPC door through httpx, 1.02x to 1.04x through aiohttp)."""
    import json

    import aiohttp

    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    traces: list[Trace] = []

    async def one(session: aiohttp.ClientSession, prompt: str, length: int) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": length, "min_tokens": length, "ignore_eos": True,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        trace, events, completion = Trace(time.perf_counter()), [], 0
        async with session.post(f"{url.rstrip('/')}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for raw in response.content:           # one line at a time
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("text"):
                    events.append(time.perf_counter())
                if event.get("usage"):
                    completion = event["usage"]["completion_tokens"]
        if events:
            completion = max(completion, len(events))       # no usage: an event is a token
            per_event = [completion // len(events)] * len(events)
            per_event[-1] += completion - sum(per_event)
            trace.arrivals = list(zip(events, per_event, strict=True))
            traces.append(trace)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            await one(session, *queue.get_nowait())

    # One session for every stream, made before the clock starts, as the gRPC side's channel is.
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Result(label or f"peer {url}", sum(t.tokens for t in traces), seconds, [t.ttft for t in traces],
                  [g for t in traces for g in t.gaps()])


def openai_door(args: argparse.Namespace) -> str:
    """The URL of llmos's OpenAI door: `--openai`, else the one the gateway of the data directory's suite serves."""
    if args.openai:
        return args.openai
    address_file = address_file_of(args.data_dir, "gateway")
    address = read_http_address(address_file) if address_file.exists() else ""
    if not address:
        raise SystemExit(f"--target openai: no OpenAI door in {address_file}; give its URL with --openai")
    return f"http://{address}"


def warm_up(jobs: list[tuple[str, int]], concurrency: int) -> list[tuple[str, int]]:
    """The requests that warm a server before it is measured, sent at the measured concurrency: a whole wave, so
    each side has run its batch shapes and touched the cache it needs at that concurrency once (a server just
    started ran its first wave of 16 at two thirds of its later speed, warmed by 2 requests)."""
    return jobs[:max(2, concurrency)]


def ratios(ours: Result, peer: Result) -> dict[str, float]:
    """llmos's figures over the peer's: throughput, and the medians of time to first token and between tokens."""
    return {"throughput": ours.tokens_per_s / peer.tokens_per_s,
            "TTFT p50": percentile(ours.ttft, 50) / percentile(peer.ttft, 50),
            "ITL p50": percentile(ours.itl, 50) / percentile(peer.itl, 50)}


def against_peer(args: argparse.Namespace, name: str, jobs: list[tuple[str, int]], ours: Result,
                 again: Callable[[], Result]) -> None:
    """The peer's figures on the same workload, measured now, and llmos's ratios to them. With `--peer-rounds N`,
    N rounds, llmos first in odd rounds and the peer first in even ones (`again` measures llmos once more): each
    round's ratios, then their medians and ranges, which a host whose speed drifts by the minute moves less."""
    model = args.peer_model or name.split(":")[0]
    key = args.peer_key or os.environ.get("OPENAI_API_KEY", "")
    asyncio.run(run_peer(args.peer, model, warm_up(jobs, args.concurrency), args.concurrency, key))

    def peer_run() -> Result:
        result = asyncio.run(run_peer(args.peer, model, jobs, args.concurrency, key))
        print(describe(result))
        return result

    rounds = [ratios(ours, peer_run())]
    for number in range(2, args.peer_rounds + 1):
        if number % 2 == 0:                 # the peer first
            peer = peer_run()
            ours = again()
        else:
            ours = again()
            peer = peer_run()
        rounds.append(ratios(ours, peer))
    if len(rounds) == 1:
        print("ratios to the peer:")
        for figure, value in rounds[0].items():
            print(f"  {figure}, llmos / peer: {value:.2f}x")
        return
    for number, figures in enumerate(rounds, 1):
        print(f"  round {number}: " + ", ".join(f"{k} {v:.2f}x" for k, v in figures.items()))
    print(f"ratios to the peer, medians of {len(rounds)} alternating rounds (range):")
    for figure in rounds[0]:
        values = sorted(r[figure] for r in rounds)
        print(f"  {figure}, llmos / peer: {statistics.median(values):.2f}x ({values[0]:.2f}-{values[-1]:.2f})")


class Baselines:
    """transformers `generate()` in this process, on the same weights and dtype, on `device` (the
    CPU, or the GPU the worker runs on)."""

    def __init__(self, path: str, dtype: str, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _sync(self) -> None:
        """Waits for the device's queued work, so a time read after it counts all of it."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _generate(self, prompts: list[str], length: int):
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        with self.torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=length, min_new_tokens=length, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        self._sync()
        return out

    def one_at_a_time(self, jobs: list[tuple[str, int]]) -> Result:
        started = time.perf_counter()
        for prompt, length in jobs:
            self._generate([prompt], length)
        return Result("generate() one at a time", sum(n for _, n in jobs), time.perf_counter() - started)

    def static_batches(self, jobs: list[tuple[str, int]], size: int) -> Result:
        started = time.perf_counter()
        for i in range(0, len(jobs), size):
            batch = jobs[i:i + size]
            self._generate([p for p, _ in batch], max(n for _, n in batch))
        return Result(f"generate() static batches of {size}", sum(n for _, n in jobs), time.perf_counter() - started)

    def forward_step_seconds(self, steps: int = 30) -> float:
        """Median time of one bare decode step at batch 1 with the model's own KV cache."""
        ids = self.tokenizer(PROMPTS[0], return_tensors="pt").input_ids.to(self.device)
        times = []
        with self.torch.inference_mode():
            out = self.model(ids, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                started = time.perf_counter()
                out = self.model(token, cache=cache, use_cache=True)
                self._sync()
                times.append(time.perf_counter() - started)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        return statistics.median(times)


def describe(result: Result) -> str:
    line = f"  {result.label:<34} {result.tokens_per_s:8.1f} tok/s  ({result.tokens} tokens in {result.seconds:.1f}s)"
    if result.ttft:
        line += (f"  TTFT p50 {percentile(result.ttft, 50) * 1e3:.0f} ms p99 {percentile(result.ttft, 99) * 1e3:.0f} ms"
                 f"  ITL p50 {percentile(result.itl, 50) * 1e3:.1f} ms p99 {percentile(result.itl, 99) * 1e3:.1f} ms")
    return line


def catalog_entry(args: argparse.Namespace) -> common_pb2.Model:
    with client_of_args(args) as client:
        return client.get_model(args.model)


def resolve(args: argparse.Namespace) -> tuple[str, str, str, str]:
    """(model "name:tag", store path, worker address, worker dtype) from the registry and worker."""
    model = catalog_entry(args)
    ready = [p for p in model.placements if p.state == common_pb2.Model.STATE_READY]
    if not ready:
        raise SystemExit(f"{args.model} is loaded on no worker; run `llmos models load {args.model}` first")
    worker = args.worker or ready[0].worker_address
    name = f"{model.name}:{model.tag}"
    key, tls_dir = local_credentials(args.data_dir, args.api_key)
    with open_channel(worker, tls_dir, key) as channel:
        status = worker_pb2_grpc.WorkerServiceStub(channel).GetWorkerStatus(
            worker_pb2.GetWorkerStatusRequest(), timeout=10)
    dtype = next(m.dtype for m in status.models if m.model == name)
    return name, model.store_path, worker, dtype


def measure_load(path: str, dtype: str, slots: int, max_seq_len: int, rounds: int) -> int:
    """Loads the model `rounds` times the worker's way and as a bare `from_pretrained`,
    alternating, in this process; prints the medians and their ratio."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmos.engine.loader import load_model

    device, torch_dtype = torch.device("cpu"), getattr(torch, dtype)
    bare, ours = [], []
    AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)  # the page cache is warm for both
    for _ in range(rounds):
        started = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        loaded = load_model("bench", path, device, torch_dtype, slots, max_seq_len)
        ours.append(time.perf_counter() - started)
        del loaded
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"  bare AutoModelForCausalLM.from_pretrained  {b * 1e3:7.1f} ms (median of {rounds})")
    print(f"  llmos worker load (weights, tokenizer, runner, KV cache {slots} x {max_seq_len})"
          f"  {o * 1e3:7.1f} ms")
    print(f"ratio: llmos load / bare from_pretrained: {o / b:.2f}x")
    return 0


def run_engine(engine, tokenizer, concurrency: int, tokens: int, label: str) -> tuple[Result, list[list[int]]]:
    """`concurrency` greedy requests of `tokens` tokens each submitted to `engine` at once; their
    figures and token ids."""
    import threading

    from llmos.common.domain import SamplingParams
    from llmos.engine import Sequence

    traces, outputs, done, errors = [], [], [], []
    started = time.perf_counter()
    for i in range(concurrency):
        trace, ids, finished = Trace(started), [], threading.Event()

        def deliver(item, trace=trace, ids=ids, finished=finished):
            if isinstance(item, Exception):
                errors.append(item)
                finished.set()
                return
            trace.arrivals.append((time.perf_counter(), len(item.token_ids)))
            ids.extend(item.token_ids)
            if item.finish_reason is not None:
                finished.set()
        prompt = tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]
        engine.submit(Sequence(f"{label}-{i}", prompt, SamplingParams(ignore_eos=True), tokens, deliver))
        traces.append(trace)
        outputs.append(ids)
        done.append(finished)
    for finished in done:
        finished.wait()
    seconds = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{label}: {errors[0]}")
    return Result(label, sum(t.tokens for t in traces), seconds, [t.ttft for t in traces],
                  [g for t in traces for g in t.gaps()]), outputs


def compare_implementations(path: str, dtype: str, concurrency: int, tokens: int, rounds: int) -> int:
    """The model's engine through its lean forward and through the generic one, in this process,
    alternating which goes first, `rounds` times at concurrency 1 and `concurrency`; prints the
    medians and the generic / lean ratios, and whether the greedy tokens agree."""
    import torch

    from llmos.engine import Engine, EngineDriver
    from llmos.engine.loader import load_model

    device, torch_dtype = torch.device("cpu"), getattr(torch, dtype)
    paths = ("llmos", "transformers")
    driver = EngineDriver()
    driver.start_thread()
    engines, tokenizer = {}, None
    for impl in paths:
        # On the driver's thread, as a worker does: torch's threads are then one team for all.
        loaded = driver.call(load_model, "bench", path, device, torch_dtype, concurrency * 512, 512, "", impl).result()
        tokenizer = loaded.tokenizer
        engines[impl] = Engine(f"bench-{impl}", loaded.runner, tokenizer, loaded.eos_ids, driver, prefix_cache=False)
        print(f"  {impl} forward: {loaded.measured_bytes / 2**20:.0f} MiB with its KV cache")
    try:
        for impl in paths:
            run_engine(engines[impl], tokenizer, 2, 8, "warm-up")
        for c in sorted({1, concurrency}):
            figures: dict[str, list[Result]] = {impl: [] for impl in paths}
            answers: dict[str, list] = {}
            for r in range(rounds):
                for impl in paths if r % 2 == 0 else paths[::-1]:
                    result, answers[impl] = run_engine(engines[impl], tokenizer, c, tokens, f"{impl} C={c}")
                    figures[impl].append(result)
            median = {impl: statistics.median(f.tokens_per_s for f in figures[impl]) for impl in paths}
            itl = {impl: statistics.median(percentile(f.itl, 50) for f in figures[impl]) for impl in paths}
            same = sum(a == b for a, b in zip(answers["llmos"], answers["transformers"], strict=True))
            for impl in paths:
                print(f"  C={c:<3} {impl:<12} {median[impl]:7.1f} tok/s  ITL p50 {itl[impl] * 1e3:6.1f} ms "
                      f"(medians of {rounds})")
            print(f"  C={c:<3} generic / lean: throughput {median['transformers'] / median['llmos']:.2f}x, "
                  f"ITL p50 {itl['transformers'] / itl['llmos']:.2f}x; greedy tokens identical in {same} of {c}")
    finally:
        for engine in engines.values():
            engine.stop()
        driver.stop()
    return 0


QUESTIONS = [
    "Name a river in Europe.", "How long is it?", "Which cities does it pass?", "What is its source?",
    "Is it used for shipping?", "Name a fish that lives in it.", "What about its delta?",
    "Has it ever frozen over?", "Name a bridge across it.", "Sum it up in one line.",
]


async def ask(stub, model: str, messages: list, tokens: int) -> tuple[float, str, common_pb2.Usage]:
    """One chat request: its time to first token, its text and its usage."""
    request = gateway_pb2.GenerateRequest(model=model, messages=messages,
                                          sampling=common_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True),
                                          request_id=f"bench-chat-{time.monotonic_ns()}")
    started, first, text, usage = time.perf_counter(), 0.0, "", common_pb2.Usage()
    async for response in stub.Generate(request):
        if response.token_ids and not first:
            first = time.perf_counter() - started
        text += response.text
        if response.HasField("usage"):
            usage = response.usage
    return first, text, usage


async def chat(address: str, model: str, turns: int, tokens: int,
               credentials: tuple[str | None, Path | None]) -> tuple[list, tuple]:
    """A chat of `turns` turns (each sends the earlier ones again), then its last turn's
    messages under another system prompt. Returns each turn's (TTFT, usage) and that of the
    last turn sent fresh."""
    key, tls_dir = credentials
    channel = open_aio_channel(address, str(tls_dir) if tls_dir else None, key, public=True)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    rng = random.Random()

    def system() -> common_pb2.ChatMessage:
        return common_pb2.ChatMessage(role="system", content=f"Session {rng.getrandbits(32):08x}. You are a "
                                                             "geography tutor. Answer briefly.")
    messages, figures = [system()], []
    try:
        for turn in range(turns):
            messages.append(common_pb2.ChatMessage(role="user", content=QUESTIONS[turn % len(QUESTIONS)]))
            ttft, text, usage = await ask(stub, model, messages, tokens)
            figures.append((ttft, usage))
            if turn < turns - 1:
                messages.append(common_pb2.ChatMessage(role="assistant", content=text))
        fresh = await ask(stub, model, [system(), *messages[1:]], tokens)
    finally:
        await channel.close()
    return figures, (fresh[0], fresh[2])


def conversation(args: argparse.Namespace) -> int:
    name, _, _, dtype = resolve(args)
    turns = args.conversation
    print(f"model {name} ({dtype}), a chat of {turns} turns through the gateway, {args.max_tokens} tokens a reply")
    figures, (cold, cold_usage) = asyncio.run(chat(args.gateway, name, turns, args.max_tokens,
                                                   local_credentials(args.data_dir, args.api_key)))
    for turn, (ttft, usage) in enumerate(figures, 1):
        print(f"  turn {turn:2}: TTFT {ttft * 1e3:6.1f} ms  prompt {usage.prompt_tokens:5} tokens, "
              f"{usage.cached_prompt_tokens:5} of them from the prefix cache")
    warm, usage = figures[-1]
    print(f"  turn {turns} sent fresh: TTFT {cold * 1e3:6.1f} ms  prompt {cold_usage.prompt_tokens:5} tokens, "
          f"{cold_usage.cached_prompt_tokens:5} of them from the prefix cache")
    print("ratio:")
    print(f"  last turn's TTFT, fresh / with the earlier turns cached: {cold / warm:.2f}x")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.peer_rounds < 1:
        raise SystemExit(f"--peer-rounds must be at least 1, got {args.peer_rounds}")
    if args.conversation:
        return conversation(args)
    if args.implementations:
        model = catalog_entry(args)
        print(f"model {model.name}:{model.tag} from {model.store_path} in {args.dtype}, {args.max_tokens} tokens "
              f"a request, the lean forward against the generic one")
        return compare_implementations(model.store_path, args.dtype, args.concurrency, args.max_tokens, args.rounds)
    if args.load:
        model = catalog_entry(args)
        print(f"model {model.name}:{model.tag} from {model.store_path} in {args.dtype}")
        return measure_load(model.store_path, args.dtype, args.concurrency, 2048, args.rounds)
    door = openai_door(args) if args.target == "openai" else ""
    name, path, worker, dtype = resolve(args)
    jobs = workload(args.requests, args.min_tokens, args.max_tokens, args.fixed, args.seed)
    shape = f"fixed {args.max_tokens}" if args.fixed else f"{args.min_tokens}-{args.max_tokens}"
    print(f"model {name} ({dtype}), {args.requests} requests, concurrency {args.concurrency}, "
          f"output tokens {shape}, seed {args.seed}")
    results: dict[str, Result] = {}
    targets = ["worker", "gateway"] if args.target == "both" else [args.target]

    def measured(target: str, warm: bool = False) -> Result:
        address = worker if target == "worker" else args.gateway
        credentials = local_credentials(args.data_dir, args.api_key)
        if target == "openai":              # the client the peer gets, at llmos's own OpenAI door
            key = credentials[0] or ""
            if warm:
                asyncio.run(run_peer(door, name, warm_up(jobs, args.concurrency), args.concurrency, key))
            result = asyncio.run(run_peer(door, name, jobs, args.concurrency, key, label="llmos via openai"))
            print(describe(result))
            return result
        if warm:
            asyncio.run(run_suite("warm-up", target, address, name, warm_up(jobs, args.concurrency),
                                  args.concurrency, credentials))
        result = asyncio.run(run_suite(f"llmos via {target}", target, address, name, jobs, args.concurrency,
                                       credentials))
        print(describe(result))
        return result

    for target in targets:
        results[target] = measured(target, warm=True)
    if args.json_schema:
        credentials = local_credentials(args.data_dir, args.api_key)
        constrained = asyncio.run(run_suite(
            "llmos via gateway, every request constrained", "gateway", args.gateway, name, jobs, args.concurrency,
            credentials, common_pb2.ResponseFormat(json_schema=args.json_schema)))
        print(describe(constrained))
        free = results.get("gateway") or asyncio.run(run_suite("llmos via gateway", "gateway", args.gateway, name,
                                                               jobs, args.concurrency, credentials))
        print(f"  constrained / free throughput: {constrained.tokens_per_s / free.tokens_per_s:.2f}x")
    if args.peer:
        compared = next(t for t in ("gateway", "openai", "worker") if t in results)
        against_peer(args, name, jobs, results[compared], lambda: measured(compared))
    if args.no_baselines:
        return 0
    baselines = Baselines(path, dtype, args.baseline_device)
    baselines.one_at_a_time(jobs[:1])  # warm-up
    sample = jobs[:args.baseline_requests]
    single = baselines.one_at_a_time(sample)
    static = baselines.static_batches(jobs, args.concurrency)
    step = baselines.forward_step_seconds()
    print(describe(single) + f"  (first {len(sample)} requests)")
    print(describe(static))
    print(f"  bare forward step at batch 1: {step * 1e3:.1f} ms")
    print("ratios:")
    for target, result in results.items():
        print(f"  llmos via {target} / static batches: {result.tokens_per_s / static.tokens_per_s:.2f}x")
        print(f"  llmos via {target} / one at a time:  {result.tokens_per_s / single.tokens_per_s:.2f}x")
        print(f"  llmos via {target} ITL p50 / bare forward step: {percentile(result.itl, 50) / step:.2f}x")
    if len(results) == 2:
        print(f"  gateway / worker throughput: {results['gateway'].tokens_per_s / results['worker'].tokens_per_s:.2f}x")
    return 0



def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measure the suite against generate() baselines")
    bench.add_argument("--model", default="smollm2-135m-instruct")
    bench.add_argument("--target", choices=["gateway", "worker", "both", "openai"], default="both",
                       help="llmos's gRPC door, the worker directly, both, or its OpenAI door with the peer's client")
    bench.add_argument("--openai", default="", metavar="URL",
                       help="llmos's OpenAI door for --target openai (default: the one the data directory's suite "
                            "serves)")
    bench.add_argument("--worker", default="", help="worker address (default: where the registry placed the model)")
    bench.add_argument("--requests", type=int, default=64)
    bench.add_argument("--concurrency", type=int, default=16)
    bench.add_argument("--min-tokens", type=int, default=16)
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.add_argument("--fixed", action="store_true", help="every request generates --max-tokens")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--baseline-requests", type=int, default=8,
                       help="requests the slow one-at-a-time baseline runs (a rate needs no more)")
    bench.add_argument("--no-baselines", action="store_true")
    bench.add_argument("--baseline-device", default="cpu",
                       help="where the generate() baselines run: cpu, or cuda to compare on the worker's GPU")
    bench.add_argument("--load", action="store_true",
                       help="measure loading the model from the store against a bare from_pretrained")
    bench.add_argument("--implementations", action="store_true",
                       help="compare the engine's lean and generic forward paths on the model, in this process")
    bench.add_argument("--dtype", default="bfloat16", help="dtype for --load and --implementations")
    bench.add_argument("--rounds", type=int, default=5, help="loads each way for --load, runs for --implementations")
    bench.add_argument("--peer", default="", metavar="URL",
                       help="also run the workload against this OpenAI-compatible server (e.g. "
                            "http://127.0.0.1:8012) and print llmos's ratios to it")
    bench.add_argument("--peer-model", default="", help="the model's name on the peer (default: llmos's name)")
    bench.add_argument("--peer-rounds", type=int, default=1,
                       help="with --peer: rounds of both, alternating which goes first; prints each round's ratios "
                            "and their medians")
    bench.add_argument("--json-schema", default="", metavar="SCHEMA",
                       help="also run the workload through the gateway with every request constrained to this "
                            "JSON Schema, and print the throughput ratio (a schema of long instances, such as a "
                            "string of minLength 4000, keeps every request to its length)")
    bench.add_argument("--peer-key", default="",
                       help="the peer's API key, sent as a bearer token (default: $OPENAI_API_KEY; llmos's own "
                            "HTTP door takes an llmos key)")
    bench.add_argument("--conversation", type=int, default=0, metavar="TURNS",
                       help="measure the prefix cache: the last turn's TTFT of a chat of TURNS turns, "
                            "against the same messages with nothing cached")
    bench.set_defaults(func=main)
