"""The conformance cases, one module per op family; each exports ``SPECS`` (op name -> ``OpSpec``).

Adding cases for an op: edit its family's module (``_<op>_cases`` returns the parameter dicts, ``quick`` for the small
CI matrix). Adding an op: add its ``OpSpec`` to its family's ``SPECS``.
"""

from dlinfer.testing.conformance.cases import attention, elementwise, kv_cache, linear, moe, quant

SPECS = {**elementwise.SPECS, **kv_cache.SPECS, **attention.SPECS, **moe.SPECS, **linear.SPECS, **quant.SPECS}

__all__ = ["SPECS"]
