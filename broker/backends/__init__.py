"""Capability back-ends that handlers call: files beneath a directory, HTTP egress, tunnels, the terminal sandbox."""
