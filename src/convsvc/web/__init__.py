"""What convsvc's HTTP front doors share (the agent-server API, the operator console): an
HTTP server in convsvc's own event loop, and the way in to the node's gRPC service with the
caller's credentials, so that every rule of the gRPC API holds for them too."""
