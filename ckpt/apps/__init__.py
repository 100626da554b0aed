"""The seed's applications (merge sort, Cannon's matrix multiplication, all-pairs
shortest paths) plus a tiny ring, written against the checkpoint library.

Each app module defines ``setup(rank, size)`` (register the rank's state,
deterministic from the size), ``async main(rank) -> bytes`` (the rank's part of
the result; it resumes from the registered state after a rollback) and
``reference(n, size) -> list[bytes]`` (what every rank must end with, computed
sequentially in the same arithmetic order, so results compare bit for bit).
Every message a rank consumes in step s was sent in step s, and every rank
takes the same number of steps, which blocking mode's rounds rely on.
"""

APPS = {
    "ring": "shoal.ckpt.apps.ring",
    "mergesort": "shoal.ckpt.apps.mergesort",
    "cannon": "shoal.ckpt.apps.cannon",
    "apsp": "shoal.ckpt.apps.apsp",
    "bigstate": "shoal.ckpt.apps.bigstate",
}


def load(name: str):
    import importlib

    if name not in APPS:
        raise ValueError(f"unknown app {name!r}; choose one of {', '.join(APPS)}")
    return importlib.import_module(APPS[name])
