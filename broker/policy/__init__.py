"""Who may do what: handler plugins, scopes, grants, the decision, JSON Schemas. No NATS, no Docker."""
