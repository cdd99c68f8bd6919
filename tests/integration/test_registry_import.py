"""Imports that run the real conversion child process."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmos.common.errors import FailedPrecondition, InvalidArgument
from llmos.common.names import ModelRef
from llmos.common.store import Store, sqlite_url
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


def registry(tmp_path, allow_pickle, store="store", cache=None):
    catalog = Catalog(Store(sqlite_url(tmp_path / f"r{allow_pickle}{store}.db")).ready())
    importer = Importer(tmp_path / store, SourcePolicy([tmp_path / "roots"]), allow_pickle=allow_pickle,
                        conversion_cache=cache)
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


async def test_stored_tokenizer_indexes_its_added_tokens_and_encodes_the_same(tmp_path, tiny_model_dir):
    source = tmp_path / "roots" / "tiny"
    shutil.copytree(tiny_model_dir, source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    view, _ = await registry(tmp_path, allow_pickle=False).import_model("tiny", "", str(source))
    stored_config = json.loads((Path(view.record.path) / "tokenizer_config.json").read_text())
    added = json.loads((source / "tokenizer.json").read_text())["added_tokens"]
    assert added and sorted(stored_config["added_tokens_decoder"]) == sorted(str(t["id"]) for t in added)
    stored, original = AutoTokenizer.from_pretrained(view.record.path), AutoTokenizer.from_pretrained(source)
    assert stored.added_tokens_decoder == original.added_tokens_decoder
    text = "hello world " + " ".join(t["content"] for t in added)
    assert stored(text).input_ids == original(text).input_ids
    assert stored.eos_token_id == original.eos_token_id


async def test_the_same_weights_under_another_config_are_another_model(tmp_path, tiny_model_dir):
    first, second = tmp_path / "roots" / "short", tmp_path / "roots" / "long"
    shutil.copytree(tiny_model_dir, first)
    shutil.copytree(tiny_model_dir, second)
    config = json.loads((second / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (second / "config.json").write_text(json.dumps(config))
    models = registry(tmp_path, allow_pickle=False)
    short, _ = await models.import_model("short", "", str(first))
    long, _ = await models.import_model("long", "", str(second))
    assert short.record.digest != long.record.digest and short.record.path != long.record.path
    assert (short.record.context_length, long.record.context_length) == (256, 1024)


async def test_a_conversion_cache_gives_a_new_store_the_converted_files(tmp_path, pickled_model, caplog):
    cache = tmp_path / "converted"
    first, _ = await registry(tmp_path, True, "store-a", cache).import_model("pickled", "", str(pickled_model))
    [entry] = list(cache.iterdir())
    caplog.set_level("INFO", logger="llmos.registry.importer")
    second, _ = await registry(tmp_path, True, "store-b", cache).import_model("pickled", "", str(pickled_model))
    assert "taken from the conversion cache" in caplog.text
    assert first.record.digest == second.record.digest and first.record.path != second.record.path
    for path in Path(first.record.path).iterdir():
        assert (Path(second.record.path) / path.name).read_bytes() == path.read_bytes(), path.name
    weights = next(Path(second.record.path).glob("*.safetensors"))
    assert weights.stat().st_ino == (entry / weights.name).stat().st_ino       # linked, not copied


async def test_the_catalog_says_which_forward_serves_a_model_and_refuses_what_none_can(tmp_path, tiny_model_dir):
    from tests.support.tiny_model import build_tiny_architecture

    gpt2 = build_tiny_architecture(tmp_path / "roots" / "gpt2", "gpt2")
    llama = tmp_path / "roots" / "llama"
    shutil.copytree(tiny_model_dir, llama)
    reg = registry(tmp_path, allow_pickle=False)
    view, _ = await reg.import_model("gpt2", "", str(gpt2))
    assert view.record.implementation == "transformers"
    assert view.record.context_length == 256       # GPT-2's config says n_positions
    assert (await reg.get("gpt2")).record.implementation == "transformers"
    view, _ = await reg.import_model("llama", "", str(llama))
    assert view.record.implementation == "llmos"
    bert = tmp_path / "roots" / "bert"
    shutil.copytree(gpt2, bert)
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(FailedPrecondition) as caught:          # an encoder does not generate
        await reg.import_model("bert", "", str(bert), task="generate")
    assert caught.value.reason == "NOT_A_CAUSAL_LM"
    t5 = tmp_path / "roots" / "t5"
    shutil.copytree(gpt2, t5)
    (t5 / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
                                                "is_encoder_decoder": True}))
    with pytest.raises(FailedPrecondition) as caught:          # nor is an encoder-decoder served for any task
        await reg.import_model("t5", "", str(t5))
    assert caught.value.reason == "ARCHITECTURE_NOT_SUPPORTED"
    for name in ("bert", "t5"):
        assert reg.catalog.get(ModelRef(name, "latest")) is None
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(
        [Path((await reg.get(name)).record.path).name for name in ("gpt2", "llama")])      # nothing of them stored
    view, _ = await reg.import_model("bert", "", str(bert))    # and for embeddings, an encoder is
    assert view.record.task == "embed" and view.record.tool_call_format == ""
