"""Generates the package's gRPC stubs from llmos's protos when it is built."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTOS = HERE.parent.parent / "protos"
STUBS = HERE / "llmos_client" / "v1"


def generate_stubs() -> None:
    """llmos/v1/*.proto -> llmos_client/v1/*_pb2{,_grpc}.py{,i}, importing one another as
    `llmos_client.v1` (their descriptors keep the protos' own names, so they are the same
    types as any other llmos stubs in the process)."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "llmos" / "v1").glob("*.proto"))
    if not sources:
        if any(STUBS.glob("*_pb2.py")):
            return          # an sdist, built with its stubs
        raise SystemExit(f"no protos under {PROTOS}: build llmos-client from the llmos repository")
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-I{PROTOS}", f"-I{protoc._get_resource_file_name('grpc_tools', '_proto')}",
                f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *sources]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        shutil.rmtree(STUBS, ignore_errors=True)
        STUBS.mkdir(parents=True)
        for path in sorted((Path(out) / "llmos" / "v1").iterdir()):
            text = re.sub(r"^from llmos\.v1 import", "from llmos_client.v1 import", path.read_text(), flags=re.M)
            (STUBS / path.name).write_text(text)
        (STUBS / "__init__.py").write_text('"""Generated from llmos/v1/*.proto when the package is built."""\n')


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
