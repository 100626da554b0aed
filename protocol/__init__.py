"""Sans-IO protocol cores: bytes in, events out. No sockets, no trio, no clocks."""

from shoal.protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = ["ProtocolError", "RemoteProtocolError", "LocalProtocolError"]
