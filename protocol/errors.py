"""The two ways a protocol core can fail.

``RemoteProtocolError`` means the other side sent something we will not accept.
It is the *only* exception a decoder raises on bad input, so a connection
handler can catch it at the boundary, count it and close the connection.
Every instance carries ``reason``: a short, fixed token (``"bad_length"``,
``"truncated"``, ...) used as a metric label, so its set of values is bounded.

``LocalProtocolError`` means our own code misused the API (encoding a value the
format cannot carry, sending an event in the wrong state). It is a bug here,
not an attack from there, and should crash loudly.
"""


class ProtocolError(Exception):
    """Base class for both directions of protocol failure."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow."""
