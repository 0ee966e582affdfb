"""The conformance kit: test a vendor against ``reference`` on fresh random inputs.

For every op of the contract (``dlinfer.ops.CORE_OPS`` and ``EXTRA_OPS``) the kit builds a matrix of cases
(odd shapes, float32/float16/bfloat16, GQA ratios 1/4/8 and MQA, block sizes 16-128, strided caches that are
views of one packed K|V buffer, shuffled block tables, mixed lengths, zero-length decode rows, chunked
prefill, non-causal prefill, ``attn_output`` given or aliasing the query, ``head_size_v != head_size``), runs
each case twice through the public wrappers of ``dlinfer.ops`` — once with the vendor under test forced for
the op, once with ``reference`` forced — on identical inputs, and compares the results.

When the vendor under test is ``reference`` itself, the other side is the independent float64 oracle of
:mod:`dlinfer.testing.oracle` instead (inputs copied to float64, results cast back to the dtype, in-place
writes kept), served through the same public wrappers by a temporary vendor ``float64_oracle``; the
tolerances stay those of the dtype, since the reference computes in float32 and rounds to the dtype.

* Outputs passed in (``attn_output``) are poisoned with NaN, and cache slots a kernel must not read hold
  NaN, so unwritten elements and reads past a sequence's end show up; a NaN or Inf in a result never passes.
* Error is the relative norm ``||out - ref|| / ||ref||`` (in float64) plus the largest absolute difference
  relative to ``max |ref|``; tolerances depend on the dtype and on whether the op accumulates products
  (attention, MoE, linear: float32 tolerances admit TF32). Writes into the cache are compared bit for bit,
  over the whole packed buffer, so stray writes show up too.
* A case the forced vendor refuses (``dlinfer.errors.NotSupportedError`` from the registry) is reported as
  ``refused`` with the reason, which is not a failure; an op the vendor does not provide is ``n/a``.

Python API::

    from dlinfer.testing.conformance import run_conformance
    report = run_conformance("triton", device="cuda")          # full matrix
    print(report.table()); assert report.ok

``dlinfer check`` is the command-line front end.

Layout: ``report`` (result model), ``inputs`` (input builders), ``spec`` (``OpSpec``), ``cases/<family>.py``
(each op's cases and how to run them), ``compare`` (tolerances, judging one output), ``runner``.
"""

from dlinfer.testing.conformance.cases import SPECS
from dlinfer.testing.conformance.compare import TOLERANCES, compare
from dlinfer.testing.conformance.report import (ERROR, FAIL, NA, ORACLE_LABEL, ORACLE_VENDOR, PASS, REFUSED, SKIPPED,
                                                CaseResult, OpSummary, Report, baseline_for)
from dlinfer.testing.conformance.runner import (ALL_OPS, DTYPES, MATMUL_OPS, interpreter_skip, run_case,
                                                run_conformance)
from dlinfer.testing.conformance.spec import OpSpec

__all__ = ["ALL_OPS", "DTYPES", "ERROR", "FAIL", "MATMUL_OPS", "NA", "ORACLE_LABEL", "ORACLE_VENDOR", "PASS",
           "REFUSED", "SKIPPED", "SPECS", "TOLERANCES", "CaseResult", "OpSpec", "OpSummary", "Report", "baseline_for",
           "compare", "interpreter_skip", "run_case", "run_conformance"]
