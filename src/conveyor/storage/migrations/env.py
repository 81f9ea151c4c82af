"""Alembic environment of Conveyor's schema. It runs the revisions on the connection that
`conveyor.storage.migrate` hands over in `config.attributes["connection"]`: a sync Connection
inside `AsyncConnection.run_sync`, already in the transaction that `Database.schema_change()`
opened (so every pending revision commits together, or none does). No fileConfig: the
application owns logging.
"""

from alembic import context
from sqlalchemy.engine import Connection

from conveyor.storage.models import Base

connection = context.config.attributes.get("connection")
if context.is_offline_mode() or not isinstance(connection, Connection):
    raise RuntimeError("run migrations through conveyor.storage.migrate, which passes a connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: batch operations rebuild the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
