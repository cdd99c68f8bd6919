"""The store's schema revisions (alembic). Applied by `llmos migrate`, or when an embedded
SQLite store is opened."""
