"""The gRPC edge: servicer, error mapping, auth, health and reflection. No business rules."""
