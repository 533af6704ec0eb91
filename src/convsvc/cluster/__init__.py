"""Clustered mode: several nodes on one PostgreSQL, one owner per running conversation.

``node`` keeps this node's membership (heartbeat, leases, takeover), ``routing`` sends each
call to the node that runs its conversation, and ``follow`` brings another node's live events
to this node's streams.
"""
