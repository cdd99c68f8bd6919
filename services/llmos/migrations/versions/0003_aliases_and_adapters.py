"""Aliases (names that point at model versions, with traffic splits) and LoRA adapters in the
catalog (a model row with the base it adapts and its rank).

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

from llmos.common.store import aliases

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A store created at 0001 by this version's schema has them already.
    bind = op.get_bind()
    have = {c["name"] for c in sa.inspect(bind).get_columns("models")}
    if "base" not in have:
        op.add_column("models", sa.Column("base", sa.String(256), nullable=False, server_default=""))
    if "adapter_rank" not in have:
        op.add_column("models", sa.Column("adapter_rank", sa.Integer, nullable=False, server_default="0"))
    aliases.create(bind, checkfirst=True)


def downgrade() -> None:
    op.drop_table("aliases")
    op.drop_column("models", "adapter_rank")
    op.drop_column("models", "base")
