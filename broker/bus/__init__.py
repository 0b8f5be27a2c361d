"""NATS: credentials, the server config, the embedded server, client connections."""
