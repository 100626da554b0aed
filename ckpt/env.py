"""A rank of a program started by ``shoal ckpt run``: its settings from the environment.

``shoal ckpt run --ranks N -- PROGRAM ARGS`` starts N processes of PROGRAM and
tells each who it is through these environment variables (and nothing else:
the program's own arguments are left to it):

========================  =============================================================
``SHOAL_CKPT_COORDINATOR`` the coordinator's RPC address, ``host:port``
``SHOAL_CKPT_TOKEN_FILE``  the file holding the group's RPC token (every call is authenticated)
``SHOAL_CKPT_GROUP``       the group's name (one per ``shoal ckpt run``)
``SHOAL_CKPT_RANK``        this process's rank id, ``0..N-1``; a restarted rank gets the same id
``SHOAL_CKPT_RANKS``       N, the number of ranks
``SHOAL_CKPT_MODE``        ``enhanced`` or ``blocking``
``SHOAL_CKPT_INTERVAL``    the checkpoint timer, seconds
``SHOAL_CKPT_SHARDS``      parity shards (1: XOR, 2..4: Reed-Solomon)
``SHOAL_CKPT_LISTEN``      where this rank's own RPC server listens, ``host:port`` (peers send there)
``SHOAL_CKPT_START``       1 for a rank's first process, 2 for its first restart, ...
========================  =============================================================

:func:`rank_from_env` builds the :class:`~shoal.ckpt.Rank` from them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from shoal.ckpt.rank import Rank
from shoal.daemons.runtime.config import ConfigError, ListenAddr, read_token

__all__ = ["ENV", "NotLaunched", "rank_from_env"]

#: The variables, by the Rank setting each carries.
ENV = {
    "coordinator": "SHOAL_CKPT_COORDINATOR",
    "token_file": "SHOAL_CKPT_TOKEN_FILE",
    "group": "SHOAL_CKPT_GROUP",
    "rank": "SHOAL_CKPT_RANK",
    "n": "SHOAL_CKPT_RANKS",
    "mode": "SHOAL_CKPT_MODE",
    "interval": "SHOAL_CKPT_INTERVAL",
    "shards": "SHOAL_CKPT_SHARDS",
    "listen": "SHOAL_CKPT_LISTEN",
    "start": "SHOAL_CKPT_START",
}


class NotLaunched(RuntimeError):
    """The environment does not describe a rank (the program was not started by ``shoal ckpt run``)."""


def rank_from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Rank:
    """The :class:`Rank` that ``shoal ckpt run`` started this process as.

    ``overrides`` are passed to :class:`Rank` instead of what the environment says
    (``block_size=4096``, ...). Raises :class:`NotLaunched` with one line naming the
    first variable that is missing or malformed.
    """
    env = os.environ if environ is None else environ

    def get(key: str) -> str:
        name = ENV[key]
        value = env.get(name)
        if not value:
            raise NotLaunched(f"{name} is not set: start this program with `shoal ckpt run --ranks N -- PROGRAM`")
        return value

    def parse(key: str, convert: Any) -> Any:
        text = get(key)
        try:
            return convert(text)
        except ValueError as exc:
            raise NotLaunched(f"{ENV[key]}={text!r}: {exc}") from None

    try:
        token = read_token(get("token_file"), ENV["token_file"])
    except ConfigError as exc:
        raise NotLaunched(str(exc)) from None
    kw: dict[str, Any] = {
        "mode": get("mode"), "interval": parse("interval", float), "parity_shards": parse("shards", int),
        "token": token, "listen": parse("listen", ListenAddr.parse),
    }
    kw.update(overrides)
    return Rank(parse("coordinator", ListenAddr.parse), get("group"), parse("rank", int), parse("n", int), **kw)
