"""SQL migrations of the PostgreSQL schema, applied in order by ``convsvc migrate``."""
