"""Errors a Pack sees, and the one a tool raises on purpose.

Hierarchy::

    BrokerError            the broker refused or failed a request (``.code`` is a contract error code)
    └── PermissionDenied   code ``permission_denied``: no grant, outside the grant, or identity mismatch
    ToolError              a tool's own failure: the caller gets ``tool:<code>`` and the message
"""

from __future__ import annotations

import re

TOOL_ERROR_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
TOOL_CODE_PREFIX = "tool:"
MAX_MESSAGE_CHARS = 500


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


class ToolError(Exception):
    """Raise from a tool to fail the call with your own code and message.

    ``raise ToolError("not_found", "no invoice 42")`` reaches the caller as the error code
    ``tool:not_found`` with that message (at most 500 characters). The ``tool:`` prefix keeps a tool's
    codes apart from the broker's own (``permission_denied``, ...). A code matches
    ``^[a-z][a-z0-9_]{0,31}$``; anything else is a ValueError when the ToolError is made.
    """

    def __init__(self, code: str, message: str) -> None:
        if not isinstance(code, str) or not TOOL_ERROR_CODE_RE.match(code):
            raise ValueError(f"ToolError code {code!r} must match {TOOL_ERROR_CODE_RE.pattern}")
        message = str(message)
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def wire_code(self) -> str:
        """The code the caller sees: ``tool:<code>``."""
        return TOOL_CODE_PREFIX + self.code


def error_from_reply(code: str, message: str) -> BrokerError:
    """Map a reply's error to the SDK's exception type."""
    if code == "permission_denied":
        return PermissionDenied(message)
    return BrokerError(code, message)


def cap_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """One safe line of at most `limit` characters: control characters become spaces."""
    clean = "".join(" " if (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0) else c for c in text).strip()
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"
