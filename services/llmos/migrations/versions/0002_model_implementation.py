"""The catalog records which of the engine's forward paths serves each model.

Models imported before were all of the lean path's families (the engine ran no other), so
existing rows read "llmos".

Revision ID: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A store created at 0001 by this version's schema has the column already.
    if "implementation" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("models")}:
        op.add_column("models", sa.Column("implementation", sa.String(32), nullable=False, server_default="llmos"))


def downgrade() -> None:
    op.drop_column("models", "implementation")
