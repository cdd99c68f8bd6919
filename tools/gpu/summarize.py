"""One line of the GPU check's summary from a `llmos bench` output:
python summarize.py FILE MODEL C RC SECONDS"""

from __future__ import annotations

import re
import sys


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def main() -> None:
    path, model, c, rc, secs = sys.argv[1:]
    text = open(path, errors="replace").read()
    rate = {m[1].strip(): float(m[2]) for m in re.finditer(r"^  (\S.*?)\s+([\d.]+) tok/s", text, re.M)}
    itl = {m[1].strip(): m[2] for m in re.finditer(r"^  (\S.*?)\s+[\d.]+ tok/s.*ITL p50 ([\d.]+) ms", text, re.M)}
    step = re.search(r"bare forward step at batch 1: ([\d.]+) ms", text)
    worker, gateway = rate.get("llmos via worker"), rate.get("llmos via gateway")
    static = next((v for k, v in rate.items() if k.startswith("generate() static")), None)
    single = rate.get("generate() one at a time")
    line = (f"bench {model} C={c}: worker {fmt(worker)} tok/s (ITL p50 {itl.get('llmos via worker', '-')} ms), "
            f"gateway {fmt(gateway)} tok/s (ITL p50 {itl.get('llmos via gateway', '-')} ms); generate() static "
            f"{fmt(static)}, one at a time {fmt(single)}, bare step {step[1] if step else '-'} ms; gateway/static "
            f"{ratio(gateway, static)}, worker/static {ratio(worker, static)}, worker/one at a time "
            f"{ratio(worker, single)}; rc={rc} in {secs}s")
    if worker is None:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        line += f"; FAILED: {last[0][:200]}"
    print(line)


if __name__ == "__main__":
    main()
