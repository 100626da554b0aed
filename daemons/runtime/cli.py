"""The one CLI helper: call a daemon's RPC from a command, fail in one line.

Every ``shoal`` subcommand that talks to a running daemon does it through
:func:`call`. The daemon is named by ``target``: a path (anything with a
``/``) is its unix control socket, anything else ``host:port`` of its TCP RPC
listener. Whatever goes wrong (an unreadable or short token file, a bad
address, nobody listening, a refused handshake, an error the daemon answers)
becomes one line on stderr, ``shoal: <what went wrong>``, and exit status 2
(:data:`EXIT_USAGE`), never a traceback. Parameters travel as a
:class:`~shoal.protocol.contract.Contract` (encoded here) or a plain map.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

__all__ = ["EXIT_USAGE", "fail", "die", "call"]

EXIT_USAGE = 2


def fail(message: str) -> int:
    """Print ``shoal: message`` on stderr; return the exit status for it."""
    print(f"shoal: {message}", file=sys.stderr)
    return EXIT_USAGE


def die(message: str) -> NoReturn:
    """:func:`fail` and exit."""
    raise SystemExit(fail(message))


def call(target: str, method: str, params: Any = None, *, what: str, token_file: str | None = None,
         token_option: str = "--token-file", timeout: float = 30.0, message_only: tuple[str, ...] = ()) -> Any:
    """One RPC call to the daemon at ``target`` (``what`` names it in errors).

    An error the daemon answers is printed as ``code: message``, or as the
    message alone for the codes in ``message_only`` (whose message is already
    a complete sentence for a user, like a job spec's ``cycle: a -> a``).
    """
    import trio

    from shoal.daemons.runtime.config import ConfigError, ListenAddr, read_token
    from shoal.daemons.runtime.rpc import RpcConnectionError, RpcError, connect_tcp, connect_unix
    from shoal.protocol.contract import Contract

    try:
        token = read_token(token_file, token_option)
    except ConfigError as exc:
        die(str(exc))
    if isinstance(params, Contract):
        params = params.encode()
    unix = "/" in target
    if not unix:
        try:
            addr = ListenAddr.parse(target)
        except ValueError as exc:
            die(f"{what} address {target!r}: {exc}")

    async def one_call() -> Any:
        if unix:
            client = await connect_unix(target, token=token)
        else:
            client = await connect_tcp(addr, token=token)
        async with client:
            return await client.call(method, params, timeout=timeout)

    try:
        return trio.run(one_call)
    except RpcConnectionError as exc:
        die(f"{what} at {target}: {exc}")
    except RpcError as exc:
        die(exc.message if exc.code in message_only and exc.message else str(exc))
    except OSError as exc:
        die(f"cannot reach {what} at {target}: {exc.strerror or exc}")
