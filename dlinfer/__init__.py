"""dlinfer: one op contract for LLM inference, served by pluggable chip vendors, used by several engines."""

import logging

__version__ = "0.3.0.dev0"

logging.getLogger("dlinfer").addHandler(logging.NullHandler())

from dlinfer import ops  # noqa: E402  (registers the torch.library custom ops)
from dlinfer import vendor  # noqa: E402

__all__ = ["ops", "vendor", "__version__"]
