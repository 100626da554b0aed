"""`shoal demo --only dispatch` runs its DAG job across three in-process workers."""

import io

from shoal.demo.dispatch import tour


async def test_dispatch_tour_completes_and_spreads_the_fan():
    out = io.StringIO()
    assert await tour(0, 60.0, out) == 0, out.getvalue()
    text = out.getvalue()
    assert "squares computed by the fan: [0, 1, 4, 9, 16, 25, 36, 49]" in text
    assert "12/12 done" in text and "unit check" in text
