"""Baseline: the catalog, leases, devices, tenants, API keys and leader leases.

Creates what is missing, so that a SQLite file written before the store was versioned
(registry.db, resources.db, identity.db) is adopted as it is, with the columns later added
to it by hand (leases.ttl and expire_time, models.measured_bytes and keep_alive).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

from llmos.common.store import SCHEMA

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_LATE_COLUMNS = {
    "leases": [sa.Column("ttl", sa.Double, nullable=False, server_default="0"),
               sa.Column("expire_time", sa.Double, nullable=False, server_default="0")],
    "models": [sa.Column("measured_bytes", sa.BigInteger, nullable=False, server_default="0"),
               sa.Column("keep_alive", sa.Double, nullable=True)],
}


def upgrade() -> None:
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    for table, columns in _LATE_COLUMNS.items():
        if table in existing:
            have = {c["name"] for c in sa.inspect(bind).get_columns(table)}
            for column in columns:
                if column.name not in have:
                    op.add_column(table, column)
    SCHEMA.create_all(bind, checkfirst=True)


def downgrade() -> None:
    SCHEMA.drop_all(op.get_bind())
