"""Storage: SQLAlchemy models, the database engine (SQLite/PostgreSQL), migrations, repositories."""
