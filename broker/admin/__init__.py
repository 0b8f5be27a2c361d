"""The use-cases behind CLI commands: init, build, dev, calls, demo, doctor, grants, audit, logs."""
