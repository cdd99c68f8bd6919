import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.tiny_model import build_tiny_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once from the bundled GGUF, as the registry does."""
    import subprocess

    from llmos.bundled import smollm2_gguf

    target = tmp_path_factory.mktemp("smollm2") / "model"
    subprocess.run([sys.executable, "-m", "llmos.registry.to_safetensors", "gguf", str(smollm2_gguf()), str(target)],
                   check=True, capture_output=True)
    return target


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
