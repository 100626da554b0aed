"""The lab's one error: the run cannot go on (one line, for the user)."""


class LabError(Exception):
    """The lab cannot go on; ``str()`` is one line, fit for ``shoal: ...``."""
