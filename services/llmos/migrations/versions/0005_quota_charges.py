"""The scheduler leader's quota charges (`quota_charges`), so a scheduler that takes over the
lead counts what each tenant used in the last window.

Revision ID: 0005
"""

from alembic import op

from llmos.common.store import quota_charges

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A store created at 0001 by this version's schema has the table already.
    quota_charges.create(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    op.drop_table("quota_charges")
