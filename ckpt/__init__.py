"""Shoal's diskless checkpointing library: what an application imports.

An application of n ranks runs one :class:`Rank` per process::

    from shoal.ckpt import ListenAddr, Rank

    rank = Rank(ListenAddr.parse("127.0.0.1:7745"), "my-job", rank_id, n, interval=30.0)
    state = rank.register("state", numpy_array)   # updated in place by the app

    async def main(rank: Rank) -> bytes:           # resumes from ``state`` after a rollback
        ...  # rank.send(dest, data), await rank.recv(src), await rank.safe_point()

    result = trio.run(rank.run, main)

``Rank.run`` is the entry point: it joins the group at the checkpoint
coordinator (the ``shoal checkpoint`` daemon), takes checkpoint 0, runs
``main`` and runs it again after every rollback. :class:`GroupFailed` is raised
when more ranks failed than the parity survives. See docs/checkpoint.md.

A program started by ``shoal ckpt run --ranks N -- PROGRAM`` builds its rank
with :func:`rank_from_env` (the rank id, group, coordinator and token reach it
as ``SHOAL_CKPT_*`` environment variables, :mod:`shoal.ckpt.env`).

Also here: :mod:`shoal.ckpt.apps` (the seed's example applications),
:mod:`shoal.ckpt.launcher` (run an app as real processes, kill ranks, compare
with the reference), :mod:`shoal.ckpt.run` (``shoal ckpt run``) and :mod:`shoal.ckpt.cli`
(``shoal ckpt status|demo|run``).
"""

from shoal.ckpt.env import NotLaunched, rank_from_env
from shoal.ckpt.rank import GroupFailed, Rank
from shoal.daemons.runtime.config import ListenAddr

__all__ = ["GroupFailed", "ListenAddr", "NotLaunched", "Rank", "rank_from_env"]
