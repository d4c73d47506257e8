"""Documents, ingestion and search over PostgreSQL + pgvector."""
