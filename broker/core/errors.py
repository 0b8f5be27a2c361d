"""Errors of the trusted side.

Hierarchy::

    RumiError                      root of everything the broker raises on purpose
    ├── WorkspaceError             a workspace file or layout is wrong (names the file and field)
    │   ├── GrantError             a grant file is invalid (that component stays denied)
    │   ├── ScopeError             a scope file is invalid
    │   └── PluginError            a handler plugin is malformed (refused at load)
    ├── NatsSetupError             the NATS server or its config could not be made to work
    ├── RuntimeSetupError          containers, networks or the broker process could not be set up
    │   ├── EngineUnavailable      no Docker engine answers
    │   └── Missing                an image, container or process the command needs is not there
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

Each class carries `exit_code`, the exit status of `rumi` when that error ends a command
(docs/cli.md): 1 denied or a check failed, 2 usage error (an argument or a workspace file is wrong),
3 environment missing (no Docker engine, no NATS, the Pack, its container, image or the broker not
there), 4 the broker or a tool failed.
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


# `rumi` exit statuses (docs/cli.md).
EXIT_OK = 0
EXIT_DENIED = 1  # denied, or a check failed
EXIT_USAGE = 2  # an argument or a workspace file is wrong (typer's own usage errors exit 2 too)
EXIT_ENVIRONMENT = 3  # no Docker engine, no NATS, the Pack not running
EXIT_FAILED = 4  # the broker or a tool failed


class RumiError(Exception):
    """Root of the broker's own errors."""

    exit_code: ClassVar[int] = EXIT_FAILED


class WorkspaceError(RumiError):
    """A workspace file or layout is wrong."""

    exit_code = EXIT_USAGE


class GrantError(WorkspaceError):
    """A grant file is invalid."""


class ScopeError(WorkspaceError):
    """A scope file is invalid."""


class PluginError(WorkspaceError):
    """A handler plugin is malformed."""


class NatsSetupError(RumiError):
    """The NATS server or its configuration could not be made to work."""

    exit_code = EXIT_ENVIRONMENT


class AuditError(RumiError):
    """An audit event could not be stored or read."""


class ChainBroken(AuditError):
    """A hash chain does not verify."""

    exit_code = EXIT_DENIED


class RequestError(RumiError):
    """A request is refused with a contract error code; the message is safe to show the Pack."""

    code: ClassVar[ErrorCode] = "handler_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Denied(RequestError):
    code = "permission_denied"
    exit_code = EXIT_DENIED


class InvalidRequest(RequestError):
    code = "invalid_request"
    exit_code = EXIT_USAGE


class UnknownCapability(RequestError):
    code = "unknown_capability"
    exit_code = EXIT_USAGE


class TooLarge(RequestError):
    code = "too_large"
    exit_code = EXIT_USAGE


class RateLimited(RequestError):
    code = "rate_limited"


class Timeout(RequestError):
    code = "timeout"


class HandlerFailed(RequestError):
    code = "handler_error"


class Unavailable(RequestError):
    code = "unavailable"
    exit_code = EXIT_ENVIRONMENT


class RuntimeSetupError(RumiError):
    """Containers, networks or the broker process could not be set up as Rumi needs them."""


class EngineUnavailable(RuntimeSetupError):
    """No Docker engine answers."""

    exit_code = EXIT_ENVIRONMENT


class Missing(RuntimeSetupError):
    """An image, container or process the command needs is not there; the message names what makes it."""

    exit_code = EXIT_ENVIRONMENT


def exit_code(exc: BaseException) -> int:
    """The `rumi` exit status for an error that ends a command (4 for anything not a RumiError)."""
    return exc.exit_code if isinstance(exc, RumiError) else EXIT_FAILED


def request_error(code: str, message: str) -> RequestError:
    """The RequestError for a contract error `code` in a reply (HandlerFailed for an unknown one)."""
    for cls in (Denied, InvalidRequest, UnknownCapability, TooLarge, RateLimited, Timeout, Unavailable):
        if cls.code == code:
            return cls(message)
    return HandlerFailed(message)
