"""Rumi's trusted side: the permission broker, its policy, audit and the admin CLI."""

__all__: list[str] = []
