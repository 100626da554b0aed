"""A shared byte-rate limit, awaited by whoever moves bytes.

One :class:`Throttle` per direction for the whole session (``[limits]``), and
one per direction per torrent (``shoal peer add --upload-rate``); a block
passes the torrent's and then the session's. It is a token bucket
(:mod:`shoal.daemons.runtime.ratelimit`) on trio's clock: ``take`` returns at
once while tokens last and otherwise sleeps until enough have accrued.
"""

from __future__ import annotations

import trio

from shoal.daemons.runtime.ratelimit import TokenBucket


class Throttle:
    """A shared byte-rate limit; ``rate`` 0 means unlimited."""

    def __init__(self, rate: int) -> None:
        self.set_rate(rate)

    def set_rate(self, rate: int) -> None:
        self.rate = rate
        # A burst of a quarter second, but never less than two blocks, so a
        # 16 KiB request can always eventually be paid for.
        self.bucket = TokenBucket(rate, max(rate / 4, 2 * 16384), trio.current_time()) if rate else None

    async def take(self, nbytes: int) -> None:
        while self.bucket is not None:
            now = trio.current_time()
            if self.bucket.take(now, nbytes):
                return
            await trio.sleep((nbytes - self.bucket.tokens) / self.rate)
