"""dlinfer's GPU benchmarks: ``gpu_suite.py`` (entry point), ``timing.py``, ``peers.py``, ``report.py``."""
