"""Moved to :mod:`shoal.core.dispatch.machine` (the dispatcher's I/O-free state machine).

Kept only for ``tests/test_ops.py``, which imports ``Core`` from here; the lead
is to point that import at ``shoal.core.dispatch.machine`` and delete this file.
"""

from shoal.core.dispatch.machine import Core

__all__ = ["Core"]
