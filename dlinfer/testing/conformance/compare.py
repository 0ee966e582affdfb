"""How one output is judged against its baseline's: tolerances per kind and dtype, NaN/Inf never pass, cache
writes bit for bit."""

from __future__ import annotations

import math

import torch

# (relative-norm tolerance, max-abs tolerance as a fraction of max |ref|) per kind and dtype.
TOLERANCES: dict[str, dict[torch.dtype, tuple[float, float]]] = {
    "elementwise": {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1.6e-2, 6e-2)},
    "matmul": {torch.float32: (2e-3, 1e-2), torch.float16: (3e-3, 2e-2), torch.bfloat16: (2e-2, 8e-2)},
    "exact": {torch.float32: (0.0, 0.0), torch.float16: (0.0, 0.0), torch.bfloat16: (0.0, 0.0)},
}


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str,
            nonfinite: bool = False) -> tuple[bool, float, float, str]:
    """``(ok, rel_err, max_abs, why)`` of one output against the reference's.

    ``nonfinite``: the case puts NaN/Inf into the inputs on purpose, so the reference may hold NaN/Inf; the
    output must then hold NaN exactly where the reference does and the same infinities (NaN in, NaN out: a
    vendor that turns them into numbers fails), and the finite elements are compared as usual.
    """
    if not isinstance(out, torch.Tensor):
        return False, math.inf, math.inf, f"{name}: expected a tensor, got {type(out).__name__}"
    if tuple(out.shape) != tuple(ref.shape):
        return False, math.inf, math.inf, f"{name}: shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    if out.dtype != ref.dtype:
        return False, math.inf, math.inf, f"{name}: dtype {out.dtype}, reference {ref.dtype}"
    if ref.dtype in (torch.int32, torch.int64):
        return True, 0.0, 0.0, ""  # integer outputs are judged by the op's own check
    o, r = out.detach().double(), ref.detach().double()
    if kind == "exact":
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
        bad = int((~same).sum())
        if bad:
            finite = torch.isfinite(o) & torch.isfinite(r)
            max_abs = float((o - r)[finite].abs().max()) if bool(finite.any()) else math.inf
            idx = tuple(int(i) for i in torch.nonzero(~same)[0].tolist())
            return False, math.inf, max_abs, f"{name}: {bad} elements differ (first at {idx}); writes must be exact"
        return True, 0.0, 0.0, ""
    if not bool(torch.isfinite(r).all()):
        if not nonfinite:
            return False, math.inf, math.inf, f"{name}: the reference output is not finite (a bug in the kit)"
        why = _nonfinite_mismatch(name, o, r)
        if why:
            return False, math.inf, math.inf, why
        keep = torch.isfinite(r)
        o, r = o[keep], r[keep]
    bad = ~torch.isfinite(o)
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        return False, math.inf, math.inf, (f"{name}: {int(bad.sum())} NaN/Inf elements (first at {idx}): "
                                           "unwritten output or a read of a slot it must not read")
    diff = o - r
    ref_norm = float(r.norm())
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    ref_max = float(r.abs().max()) if r.numel() else 0.0
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else (0.0 if max_abs == 0 else math.inf)
    rtol, afrac = TOLERANCES[kind][dtype]
    abs_bound = afrac * max(ref_max, 1e-3)
    if ref_norm == 0:
        ok = max_abs <= abs_bound
        why = "" if ok else f"{name}: max |out - ref| {max_abs:.3e} where the reference is all zeros"
        return ok, (0.0 if ok else math.inf), max_abs, why
    ok = rel <= rtol and max_abs <= abs_bound
    why = "" if ok else (f"{name}: rel err {rel:.3e} (tol {rtol:.0e}), max abs {max_abs:.3e} "
                         f"(tol {abs_bound:.3e})")
    return ok, rel, max_abs, why


def _nonfinite_mismatch(name: str, o: torch.Tensor, r: torch.Tensor) -> str:
    """Why ``o``'s NaN/Inf elements differ from the reference's (``""`` when they agree)."""
    for what, o_mask, r_mask in (("NaN", o.isnan(), r.isnan()), ("+Inf", o == math.inf, r == math.inf),
                                 ("-Inf", o == -math.inf, r == -math.inf)):
        differ = o_mask != r_mask
        if bool(differ.any()):
            idx = tuple(int(i) for i in torch.nonzero(differ)[0].tolist())
            masked = bool(r_mask[idx]) and not bool(o_mask[idx])
            return (f"{name}: {int(differ.sum())} elements where the reference has {what} and the output has not, "
                    f"or the other way round (first at {idx}, output {float(o[idx])}, reference {float(r[idx])})"
                    + ("; NaN/Inf in must give NaN/Inf out, never a number" if masked else ""))
    return ""
