"""A store written by the release before a migration is brought forward with its rows kept."""

import sqlalchemy as sa

from llmos.common.names import ModelRef
from llmos.common.store import Store
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
