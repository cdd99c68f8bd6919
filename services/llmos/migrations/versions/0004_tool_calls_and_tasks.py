"""The catalog records how each model writes tool calls (`common.tools.format_of` of its chat
template; models already imported get it from the template in their store directory) and the
task it serves (models already imported were all causal LMs: "generate").

Revision ID: 0004
"""

from pathlib import Path

import sqlalchemy as sa
from alembic import op

from llmos.common.tools import format_of
from llmos.registry.weights import chat_template_of

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    # A store created at 0001 by this version's schema has the column already.
    if "tool_call_format" not in {c["name"] for c in sa.inspect(bind).get_columns("models")}:
        op.add_column("models", sa.Column("tool_call_format", sa.String(32), nullable=False, server_default=""))
    if "task" not in {c["name"] for c in sa.inspect(bind).get_columns("models")}:
        op.add_column("models", sa.Column("task", sa.String(16), nullable=False, server_default="generate"))
    models = sa.table("models", sa.column("name"), sa.column("tag"), sa.column("path"),
                      sa.column("has_chat_template"), sa.column("tool_call_format"))
    for name, tag, path in bind.execute(sa.select(models.c.name, models.c.tag, models.c.path).where(
            models.c.has_chat_template.is_(True), models.c.tool_call_format == "")).all():
        directory = Path(path)
        template = chat_template_of(directory) if directory.is_dir() else None
        if template:
            bind.execute(models.update().where(models.c.name == name, models.c.tag == tag)
                         .values(tool_call_format=format_of(template)))


def downgrade() -> None:
    op.drop_column("models", "task")
    op.drop_column("models", "tool_call_format")
