"""What the registry refuses at the door, each with its code and reason."""

import os

import pytest

from llmos.common.errors import InvalidArgument, NotFound, PermissionDenied
from llmos.registry.importer import Importer
from llmos.registry.sources import SourcePolicy
from tests.unit.registry.test_registry import make_source


@pytest.fixture
def roots(tmp_path):
    inside, outside = tmp_path / "models", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    return inside, outside


def test_a_source_inside_the_roots_resolves_absolute_or_relative(roots):
    inside, _ = roots
    make_source(inside / "tiny")
    policy = SourcePolicy([inside])
    assert policy.resolve(str(inside / "tiny")) == (inside / "tiny").resolve()
    assert policy.resolve("tiny") == (inside / "tiny").resolve()


def test_path_traversal_is_refused_even_when_it_lands_inside(roots):
    inside, _ = roots
    make_source(inside / "tiny")
    with pytest.raises(InvalidArgument) as caught:
        SourcePolicy([inside]).resolve(str(inside / "tiny" / ".." / "tiny"))
    assert caught.value.reason == "PATH_TRAVERSAL"
    with pytest.raises(InvalidArgument):
        SourcePolicy([inside]).resolve("../elsewhere")


def test_an_absolute_path_outside_the_roots_is_refused(roots):
    inside, outside = roots
    make_source(outside / "secret")
    with pytest.raises(PermissionDenied) as caught:
        SourcePolicy([inside]).resolve(str(outside / "secret"))
    assert caught.value.reason == "SOURCE_OUTSIDE_ALLOWED_ROOTS"


def test_a_symlink_out_of_the_roots_is_refused(roots):
    inside, outside = roots
    make_source(outside / "secret")
    os.symlink(outside / "secret", inside / "link")
    with pytest.raises(PermissionDenied) as caught:
        SourcePolicy([inside]).resolve("link")
    assert caught.value.reason == "SOURCE_OUTSIDE_ALLOWED_ROOTS"
    make_source(inside / "tiny")
    os.symlink(outside / "secret" / "model.safetensors", inside / "tiny" / "extra.safetensors")
    with pytest.raises(PermissionDenied) as caught:
        SourcePolicy([inside]).resolve("tiny")
    assert caught.value.reason == "SYMLINK_OUTSIDE_ALLOWED_ROOTS"


def test_pickle_weights_are_refused_unless_allowed(roots):
    inside, _ = roots
    (inside / "pickled").mkdir()
    (inside / "pickled" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (inside / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    refusing = Importer(inside.parent / "store", SourcePolicy([inside]))
    with pytest.raises(InvalidArgument) as caught:
        refusing.source_digest(refusing.resolve("pickled"))
    assert caught.value.reason == "PICKLE_WEIGHTS_REFUSED"
    with pytest.raises(InvalidArgument) as caught:
        refusing.source_digest(refusing.resolve("pickled/pytorch_model.bin"))
    assert caught.value.reason == "PICKLE_WEIGHTS_REFUSED"
    allowing = Importer(inside.parent / "store2", SourcePolicy([inside]), allow_pickle=True)
    kind, digest = allowing.source_digest(allowing.resolve("pickled"))
    assert kind == "pickle" and digest.startswith("sha256:")


def test_bundled_sources_and_unknown_ones():
    policy = SourcePolicy([])
    assert policy.resolve("bundled:smollm2-135m-instruct").suffix == ".gguf"
    with pytest.raises(NotFound):
        policy.resolve("bundled:nope")
