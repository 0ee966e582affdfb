"""A vendor plugin that cannot load on this machine, as happens when a chip's runtime library is missing.

dlinfer must log that it skipped this plugin (with this error) and keep working: ``import dlinfer`` and every
other vendor are unaffected.
"""

raise ImportError("libexamplechip.so.1: cannot open shared object file (the example chip's runtime is not "
                  "installed)")
