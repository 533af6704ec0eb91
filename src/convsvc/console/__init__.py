"""The operator console: convsvc's conversations, their events, workers and the audit log in
a browser, live. A client of the node's own gRPC service with the operator's token (held in
an HttpOnly cookie), so the API's rules hold: READ tokens look, ADMIN tokens act, and every
action is audited."""
