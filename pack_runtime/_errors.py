"""Errors a Pack sees.

Hierarchy::

    BrokerError            the broker refused or failed a request (``.code`` is a contract error code)
    └── PermissionDenied   code ``permission_denied``: no grant, outside the grant, or identity mismatch
"""

from __future__ import annotations


class BrokerError(Exception):
    """A request through the broker did not succeed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class PermissionDenied(BrokerError):
    """The broker denied the request."""

    def __init__(self, message: str, code: str = "permission_denied") -> None:
        super().__init__(code, message)


def error_from_reply(code: str, message: str) -> BrokerError:
    """Map a reply's error to the SDK's exception type."""
    if code == "permission_denied":
        return PermissionDenied(message)
    return BrokerError(code, message)
