"""The use-cases behind CLI commands: init, doctor, dev, demo."""
