"""Imports that run the real conversion child process."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmos.common.errors import InvalidArgument
from llmos.registry.catalog import Catalog
from llmos.registry.importer import Importer
from llmos.registry.models import ModelRegistry
from llmos.registry.sources import SourcePolicy


class NoWorkers:
    async def start_model(self, *args):
        raise AssertionError("not used")


@pytest.fixture
def pickled_model(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    target = tmp_path / "roots" / "pickled"
    target.mkdir(parents=True)
    model.config.save_pretrained(target)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (target / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert (target / "pytorch_model.bin").exists() and not list(target.glob("*.safetensors"))
    return target


def registry(tmp_path, allow_pickle):
    catalog = Catalog(str(tmp_path / f"r{allow_pickle}.db"))
    importer = Importer(tmp_path / "store", SourcePolicy([tmp_path / "roots"]), allow_pickle=allow_pickle)
    return ModelRegistry(catalog, importer, NoWorkers())


async def test_pickle_weights_import_only_when_allowed_and_become_safetensors(tmp_path, pickled_model, tiny_model_dir):
    with pytest.raises(InvalidArgument) as caught:
        await registry(tmp_path, allow_pickle=False).import_model("pickled", "", str(pickled_model))
    assert caught.value.reason == "PICKLE_WEIGHTS_REFUSED"
    view, created = await registry(tmp_path, allow_pickle=True).import_model("pickled", "", str(pickled_model))
    assert created and view.record.source_format == "pickle"
    stored = AutoModelForCausalLM.from_pretrained(view.record.path, use_safetensors=True)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, a), (_, b) in zip(stored.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-2), name
