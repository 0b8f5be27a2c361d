"""The audit trail: events, the hash chain, the writer, readers, verification, stream setup."""
