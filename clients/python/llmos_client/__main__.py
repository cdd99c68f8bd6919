"""llmos-generate: streams one answer from an llmos gateway and prints it as it arrives.

    LLMOS_API_KEY=... python -m llmos_client --gateway 127.0.0.1:50051 --model smollm2 "What is 2+2?"

On error it prints the status code and the ErrorInfo reason and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import Client, LlmosError
from .v1 import common_pb2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmos-generate", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="+")
    parser.add_argument("--gateway", default="127.0.0.1:50051")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)
    finish = common_pb2.FINISH_REASON_UNSPECIFIED
    with Client(args.gateway, api_key=os.environ.get("LLMOS_API_KEY") or None) as client:
        try:
            for piece in client.generate(args.model, messages=[("user", " ".join(args.prompt))],
                                         max_tokens=args.max_tokens, timeout=args.timeout):
                print(piece.text, end="", flush=True)
                finish = piece.finish_reason or finish
        except LlmosError as error:
            print()
            print(f"error: {error.code().name} reason={error.reason}: {error.details()}", file=sys.stderr)
            return 1
    print()
    print(f"finish: {common_pb2.FinishReason.Name(finish)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
