"""`shoal demo --only dispatch` runs its DAG job across three in-process workers, the fan
reading the producer's output from another worker's work directory."""

import io
import re

from shoal.demo.dispatch import tour


async def test_dispatch_tour_completes_and_spreads_the_fan():
    out = io.StringIO()
    assert await tour(0, 60.0, out) == 0, out.getvalue()
    text = out.getvalue()
    assert "squares computed by the fan: [1, 4, 9, 16, 25, 36, 49, 64]" in text
    assert "12/12 done" in text and "unit check" in text
    fetched = re.search(r"data.txt was made on (node-\w) and fetched by (.*)", text)
    assert fetched and fetched[2] != "no other worker", text  # the data crossed workers
