"""The registry's shared state (`registry_workers`, `placements`, `drains`, `model_holds`,
`model_events`), so that any registry replica serves any call.

Revision ID: 0006
"""

from alembic import op

from llmos.common.store import drains, model_events, model_holds, placements, registry_workers

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TABLES = (registry_workers, placements, drains, model_holds, model_events)


def upgrade() -> None:
    # A store created at 0001 by this version's schema has the tables already.
    for table in TABLES:
        table.create(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    for table in reversed(TABLES):
        op.drop_table(table.name)
