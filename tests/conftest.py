import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Without a GPU, Triton's interpreter runs the engine's GPU kernels (tests/integration/test_gpu_kernels.py,
# where LLMOS_ENGINE_INTERPRET_GPU_KERNELS asks for them); Triton reads this as it is first imported.
if os.environ.get("LLMOS_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.support.tiny_model import build_tiny_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from the bundled GGUF by the registry's own importer: from
    its conversion cache when LLMOS_REGISTRY_CONVERSION_CACHE names one (as `make test` does)."""
    import asyncio
    import os

    from llmos.registry.bundled import smollm2_gguf
    from llmos.registry.importer import Importer
    from llmos.registry.sources import SourcePolicy

    gguf = smollm2_gguf()
    cache = os.environ.get("LLMOS_REGISTRY_CONVERSION_CACHE")
    importer = Importer(tmp_path_factory.mktemp("smollm2"), SourcePolicy([gguf.parent]),
                        conversion_cache=Path(cache) if cache else None)
    source_format, digest = importer.source_digest(gguf)
    return asyncio.run(importer.bring_in(gguf, source_format, digest)).path


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session; tests take a database each (`store_url`)."""
    import tempfile

    from tests.support.postgres import PostgresServer

    # Not under pytest's temporary directory: its parents are root's alone, and the server may
    # run as another user.
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="llmos-test-postgres-"))).init().start()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """The URL of an empty store of each kind, migrated."""
    from llmos.common.store import Store, sqlite_url

    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "store.db")
    else:
        url = request.getfixturevalue("postgres").create_database()
    store = Store(url)
    store.migrate()
    store.close()
    return url
