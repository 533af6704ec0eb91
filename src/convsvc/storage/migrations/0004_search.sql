-- Searches over every stored conversation (SearchConversations): its labels and title, the
-- agent state its owner last logged (kept with each commit of its events), and indexes that
-- read a page in order of last activity, everyone's, one user's or one agent state's. No index
-- is restricted to running conversations: with stale statistics the planner takes such an
-- index for the cluster's own queries about running ones (see 0003).
ALTER TABLE conversations
    ADD COLUMN labels jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN title text NOT NULL DEFAULT '',
    ADD COLUMN agent_state text NOT NULL DEFAULT '';
CREATE INDEX conversations_by_activity
    ON conversations (last_active_time DESC, conversation_id DESC);
CREATE INDEX conversations_by_user_activity
    ON conversations (user_id, last_active_time DESC, conversation_id DESC);
CREATE INDEX conversations_by_labels ON conversations USING gin (labels jsonb_path_ops);
CREATE INDEX conversations_by_state_activity
    ON conversations (agent_state, last_active_time DESC, conversation_id DESC);
