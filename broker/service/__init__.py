"""The request path: from a message on the bus to a handler and back, audited; per-Pack rate limits."""
