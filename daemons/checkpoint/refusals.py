"""One way a checkpoint handler refuses a call, counted by its code.

A handler refuses with :class:`Refused` (a domain code of
:data:`shoal.protocol.checkpoint.ERROR_CODES`), with a core
:class:`~shoal.core.checkpoint.group.Refusal` (turned into a ``Refused`` here)
or with ``BadParams`` (bad input, also what the contracts raise). Each is
counted in ``shoal_checkpoint_refused_total{reason}`` before it goes back.
"""

from __future__ import annotations

from collections.abc import Iterable

from shoal.core.checkpoint.group import Refusal
from shoal.daemons.checkpoint.metrics import CheckpointMetrics
from shoal.daemons.runtime.rpc import Handler, RpcError
from shoal.protocol.contract import BadParams

__all__ = ["Refused", "counted", "wrong_role"]


class Refused(RpcError):
    """A request refused for a reason in metrics.REFUSALS."""


def _counting(metrics: CheckpointMetrics, handler: Handler) -> Handler:
    async def counted_handler(params):
        try:
            return await handler(params)
        except Refused as exc:
            metrics.refuse(exc.code)
            raise
        except Refusal as exc:
            metrics.refuse(exc.code)
            raise Refused(exc.code, exc.message) from None
        except BadParams:
            metrics.refuse("bad_params")
            raise

    counted_handler.__name__ = getattr(handler, "__name__", "handler")
    return counted_handler


def counted(metrics: CheckpointMetrics, handlers: dict[str, Handler]) -> dict[str, Handler]:
    """``handlers`` (from ``handlers_of``), each counting its refusals."""
    return {name: _counting(metrics, h) for name, h in handlers.items()}


def wrong_role(metrics: CheckpointMetrics, names: Iterable[str], message: str) -> dict[str, Handler]:
    """Handlers for the other role's methods: each refuses with ``wrong_role``."""

    async def refuse(params):
        metrics.refuse("wrong_role")
        raise RpcError("wrong_role", message)

    return dict.fromkeys(names, refuse)
