"""The error vocabulary shared by every layer.

Each error says whose fault it is, so that the daemon can pick the one recovery
that fits (another parent, the source, a clean message to the client).
"""

from __future__ import annotations


class DamselflyError(Exception):
    """Base class; ``str(err)`` is a one-line message fit for a user."""

    #: Dragonfly's X-Dragonfly-Error-Type vocabulary: backend, proxy or dfdaemon.
    error_type = "dfdaemon"


class InvalidArgument(DamselflyError, ValueError):
    """Malformed input: a URL, a header, a config value, a frame."""


class NotFound(DamselflyError, LookupError):
    """The task, piece or peer is not there."""


class Busy(NotFound):
    """The parent's upload slots are all taken: ask again shortly, or ask another parent.

    A NotFound for the piece *now*, so every transport keeps the connection open.
    """


class Declined(NotFound):
    """The parent will not send this piece now (it went out already: a peer holds it); ask another."""


class BackendError(DamselflyError):
    """The origin (HTTP server, registry, bucket) failed or refused."""

    error_type = "backend"

    def __init__(self, message: str, *, status_code: int = 0, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.headers = dict(headers or {})


class ProtocolError(DamselflyError):
    """A peer broke the Vortex protocol (truncated, oversized or lying frame)."""


class PieceCorrupt(DamselflyError):
    """A piece's bytes do not match its digest."""


class PeerError(DamselflyError):
    """A parent failed: refused, vanished or answered with an error frame."""


class StorageError(DamselflyError):
    """The local store failed (full disk, permissions, corrupt metadata)."""


class Unavailable(DamselflyError):
    """A plugin cannot run here (no device, an extra not installed)."""


class PermissionDenied(DamselflyError, PermissionError):
    """The request may not do this: a refused origin, a local file asked for from the network,
    a host or role a certificate does not name."""
