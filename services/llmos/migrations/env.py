"""alembic's environment: runs the revisions on the connection `Store.migrate` passes in."""

from alembic import context

from llmos.common.store import SCHEMA

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=SCHEMA, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
