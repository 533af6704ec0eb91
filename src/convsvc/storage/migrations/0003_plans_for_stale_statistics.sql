-- Plans that hold however stale the statistics are.
--
-- Nodes start thousands of conversations in minutes, long before autovacuum analyzes the
-- table again. Until it does, the statistics say almost nothing runs, so every index
-- restricted to "WHERE running" looks empty and the planner may pick any of them for any
-- query about running conversations, reading all of them through a filter: one user's
-- count for the per-user limit walked the index of owners, every running conversation, and
-- starts slowed down as the nodes filled. Here each query finds its rows through an index
-- condition on what it selects by (the user, the owner), whatever the statistics say.
DROP INDEX conversations_running_by_user;
DROP INDEX conversations_running_by_owner;
CREATE INDEX conversations_by_user ON conversations (user_id, running, conversation_id);
CREATE INDEX conversations_by_owner ON conversations (owner_node) WHERE owner_node IS NOT NULL;
-- Handed off or waiting for a taker: empty most of the time, and exactly what a scan reads.
CREATE INDEX conversations_running_without_owner
    ON conversations (conversation_id) WHERE running AND owner_node IS NULL;
