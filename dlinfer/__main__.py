"""``python -m dlinfer``: the ``dlinfer`` command (``dlinfer info``, ``dlinfer check``, ...) where its console script
is not on the PATH (a source checkout on ``PYTHONPATH``, a ``--target`` install)."""

import sys

from dlinfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
