"""Errors of the trusted side.

Hierarchy::

    RumiError                      root of everything the broker raises on purpose
    ├── WorkspaceError             a workspace file or layout is wrong (names the file and field)
    │   ├── GrantError             a grant file is invalid (that component stays denied)
    │   ├── ScopeError             a scope file is invalid
    │   └── PluginError            a handler plugin is malformed (refused at load)
    ├── NatsSetupError             the NATS server or its config could not be made to work
    ├── RuntimeSetupError          containers, networks or the broker process could not be set up
    │   └── EngineUnavailable      no Docker engine answers
    ├── AuditError                 an audit event could not be stored or read
    │   └── ChainBroken            `rumi audit verify` found a changed, missing or reordered event
    └── RequestError               a request is refused; carries a contract error code
        ├── Denied                 permission_denied
        ├── InvalidRequest         invalid_request
        ├── UnknownCapability      unknown_capability
        ├── TooLarge               too_large
        ├── RateLimited            rate_limited
        ├── Timeout                timeout
        ├── HandlerFailed          handler_error
        └── Unavailable            unavailable
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorCode = Literal[
    "permission_denied",
    "invalid_request",
    "unknown_capability",
    "too_large",
    "rate_limited",
    "timeout",
    "handler_error",
    "unavailable",
]
ERROR_CODES: tuple[ErrorCode, ...] = (
    "permission_denied",
    "invalid_request",
    "unknown_capability",
    "too_large",
    "rate_limited",
    "timeout",
    "handler_error",
    "unavailable",
)


class RumiError(Exception):
    """Root of the broker's own errors."""


class WorkspaceError(RumiError):
    """A workspace file or layout is wrong."""


class GrantError(WorkspaceError):
    """A grant file is invalid."""


class ScopeError(WorkspaceError):
    """A scope file is invalid."""


class PluginError(WorkspaceError):
    """A handler plugin is malformed."""


class NatsSetupError(RumiError):
    """The NATS server or its configuration could not be made to work."""


class AuditError(RumiError):
    """An audit event could not be stored or read."""


class ChainBroken(AuditError):
    """A hash chain does not verify."""


class RequestError(RumiError):
    """A request is refused with a contract error code; the message is safe to show the Pack."""

    code: ClassVar[ErrorCode] = "handler_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Denied(RequestError):
    code = "permission_denied"


class InvalidRequest(RequestError):
    code = "invalid_request"


class UnknownCapability(RequestError):
    code = "unknown_capability"


class TooLarge(RequestError):
    code = "too_large"


class RateLimited(RequestError):
    code = "rate_limited"


class Timeout(RequestError):
    code = "timeout"


class HandlerFailed(RequestError):
    code = "handler_error"


class Unavailable(RequestError):
    code = "unavailable"


class RuntimeSetupError(RumiError):
    """Containers, networks or the broker process could not be set up as Rumi needs them."""


class EngineUnavailable(RuntimeSetupError):
    """No Docker engine answers."""
