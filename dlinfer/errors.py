"""Exceptions dlinfer raises besides ``ValueError``/``TypeError`` for bad input."""


class NotSupportedError(NotImplementedError):
    """No vendor can serve a valid call (a feature, dtype, head size ... that nothing implements here),
    or a forced vendor cannot serve it. The message lists every reason."""
