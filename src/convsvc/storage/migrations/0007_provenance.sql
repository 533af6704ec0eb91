-- Which node appended each event, under which lease epoch: a reader (an operator, the
-- partition tests' checker) can verify that one epoch had one writer and that a log's epochs
-- never go back. NULL for events appended before this migration.
ALTER TABLE events ADD COLUMN epoch bigint, ADD COLUMN writer text;

-- Audit entries are retried after a commit of unknown outcome (a database outage): the
-- entry's own id stores each once. NULL for entries stored before this migration.
ALTER TABLE audit ADD COLUMN entry_id text;
CREATE UNIQUE INDEX audit_by_entry_id ON audit (entry_id);
