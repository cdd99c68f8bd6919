"""A store written by the release before a migration is brought forward with its rows kept."""

import sqlalchemy as sa

from llmos.common.names import ModelRef
from llmos.common.store import Store
from llmos.registry.aliases import AliasBook, AliasRecord, Target
from llmos.registry.catalog import Catalog


def test_a_catalog_from_before_the_implementation_column_reads_its_models_as_the_lean_path(store_url):
    store = Store(store_url)
    with store.engine.begin() as db:     # the catalog as revision 0001 of the previous release left it
        db.execute(sa.text("ALTER TABLE models DROP COLUMN implementation"))
        db.execute(sa.text("UPDATE alembic_version SET version_num = '0001'"))
        db.execute(sa.text(
            "INSERT INTO models (name, tag, digest, source_format, source, path, architecture, parameter_count, "
            "dtype, context_length, has_chat_template, create_time, estimated_bytes, measured_bytes) VALUES "
            "('old', 'latest', 'sha256:00', 'safetensors', '/src', '/store/00', 'LlamaForCausalLM', 1, "
            "'float32', 256, true, 0, 1, 0)"))
    assert store.revision() == "0001"
    assert store.migrate() == ("0001", Store.head())
    record = Catalog(store).get(ModelRef("old", "latest"))
    assert record is not None and record.implementation == "llmos" and record.architecture == "LlamaForCausalLM"
    store.close()


def test_a_catalog_from_before_aliases_and_adapters_gains_them_with_its_models_kept(store_url):
    store = Store(store_url)
    with store.engine.begin() as db:     # the store as revision 0002 left it
        db.execute(sa.text("DROP TABLE aliases"))
        db.execute(sa.text("ALTER TABLE models DROP COLUMN base"))
        db.execute(sa.text("ALTER TABLE models DROP COLUMN adapter_rank"))
        db.execute(sa.text("UPDATE alembic_version SET version_num = '0002'"))
        db.execute(sa.text(
            "INSERT INTO models (name, tag, digest, source_format, source, path, architecture, parameter_count, "
            "dtype, context_length, has_chat_template, create_time, estimated_bytes, measured_bytes, implementation) "
            "VALUES ('old', 'latest', 'sha256:00', 'safetensors', '/src', '/store/00', 'LlamaForCausalLM', 1, "
            "'float32', 256, true, 0, 1, 0, 'llmos')"))
    assert store.migrate() == ("0002", Store.head())
    record = Catalog(store).get(ModelRef("old", "latest"))
    assert record is not None and record.base == "" and record.adapter_rank == 0
    book = AliasBook(store)
    book.put(AliasRecord(ModelRef("chat"), (Target(ModelRef("old"), 100),), update_time=1.0))
    assert book.get(ModelRef("chat")).targets == (Target(ModelRef("old"), 100),)
    store.close()


def test_models_imported_before_tool_calls_learn_their_format_from_their_template(store_url, tmp_path):
    store = Store(store_url)
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "tokenizer_config.json").write_text(
        '{"chat_template": "{% for tool in tools %}<tool_call>{% endfor %}"}')
    with store.engine.begin() as db:     # the store as revision 0003 left it
        db.execute(sa.text("ALTER TABLE models DROP COLUMN tool_call_format"))
        db.execute(sa.text("ALTER TABLE models DROP COLUMN task"))
        db.execute(sa.text("UPDATE alembic_version SET version_num = '0003'"))
        for name, path, chat in [("qwen", tmp_path / "qwen", "true"), ("gone", tmp_path / "gone", "true"),
                                 ("plain", tmp_path / "qwen", "false")]:
            db.execute(sa.text(
                "INSERT INTO models (name, tag, digest, source_format, source, path, architecture, parameter_count, "
                "dtype, context_length, has_chat_template, create_time, estimated_bytes, measured_bytes) VALUES "
                f"('{name}', 'latest', 'sha256:00', 'safetensors', '/src', '{path}', 'Qwen2ForCausalLM', 1, "
                f"'float32', 256, {chat}, 0, 1, 0)"))
    assert store.migrate() == ("0003", Store.head())
    catalog = Catalog(store)
    formats = [catalog.get(ModelRef(n, "latest")).tool_call_format for n in ("qwen", "gone", "plain")]
    assert formats == ["hermes", "", ""]
    store.close()
