"""Docker: the engine, container settings, Pack networks, the host guard, images, Pack images, Compose."""
