-- A node holds a session-level advisory lock (classid 1129270851, objid lock_key) for as
-- long as its process lives: PostgreSQL releases it the moment the process dies and its
-- connection closes, so peers take over a crashed node's conversations at once instead of
-- waiting out its lease. A node that is only silent (stopped, cut off) keeps its session, and
-- its lock, until PostgreSQL drops the connection: the lease still fences it, as before.
-- NULL for nodes that hold no such lock (older versions): the lease alone judges them.
ALTER TABLE nodes ADD COLUMN lock_key integer;
