"""Exceptions and warnings dlinfer raises besides ``ValueError``/``TypeError`` for bad input."""

from __future__ import annotations

import logging
import warnings


class NotSupportedError(NotImplementedError):
    """No vendor can serve a valid call (a feature, dtype, head size ... that nothing implements here),
    or a forced vendor cannot serve it. The message lists every reason."""


class VendorContractError(RuntimeError):
    """A vendor broke the op contract: an implementation with the wrong signature (at registration) or a result of
    the wrong count, shape or dtype (checked on the CPU always, elsewhere with ``DLINFER_CHECK=1``). The message
    names the vendor and the op."""


class DlinferWarning(UserWarning):
    """Something a user must know although the call succeeds: a fallback to the ``reference`` vendor, a vendor
    plugin that could not be loaded."""


_logger = logging.getLogger("dlinfer")


def _logging_configured() -> bool:
    """Whether the application gave the ``dlinfer`` logger (or an ancestor it propagates to) a real handler."""
    logger: logging.Logger | None = _logger
    while logger is not None:
        if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


def warn(message: str) -> None:
    """A warning the user must see: a log record when the application configured logging, else a
    :class:`DlinferWarning` through Python's ``warnings`` (printed to stderr by default). Callers de-duplicate
    per cause (``dlinfer.vendor.registry.Registry.warn_once``)."""
    if _logging_configured():
        _logger.warning(message)
    else:
        warnings.warn(message, DlinferWarning, stacklevel=3)
