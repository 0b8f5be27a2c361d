"""The leaf: ids, errors, the wire protocol, workspace paths and Pack manifests, atomic writes, labels, the Docker client. Imports nothing else of broker."""
