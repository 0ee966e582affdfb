"""Quantize a (tiny, random-weight) Hugging Face model offline into the checkpoint formats LMDeploy loads.

No calibration data: weights are quantized from their own ranges (round to nearest), which is what a test model
needs; activation statistics (AWQ's search, SmoothQuant's smoothing) are out of scope.

* ``awq``: AWQ GEMM format (``quantization_config = {"quant_method": "awq", "bits": 4, "group_size": g,
  "zero_point": true, "version": "gemm"}``): every decoder linear ``<p>.weight [out, in]`` becomes
  ``<p>.qweight`` int32 ``[in, out/8]`` (8 4-bit values per word in AWQ's nibble order ``0 2 4 6 1 3 5 7``),
  ``<p>.qzeros`` int32 ``[in/g, out/8]`` (packed the same way) and ``<p>.scales`` float16 ``[in/g, out]``;
  asymmetric per group of ``g`` input rows: ``w ~= (q - zero) * scale``. Other tensors are written in float16
  (LMDeploy runs AWQ models in float16).
* ``w8a8``: LMDeploy's SmoothQuant format (``{"quant_method": "smooth_quant", "quant_dtype": "int8"}``): every
  decoder linear's ``weight`` becomes int8 ``[out, in]`` with ``<p>.scale`` float32 ``[out, 1]``, symmetric per
  output channel: ``w ~= q * scale``. Other tensors keep the model's dtype. MoE models: every expert's
  linears too (Mixtral ``block_sparse_moe.experts.<e>.w1/w2/w3``, Qwen3-MoE ``mlp.experts.<e>.gate/up/down_proj``,
  the names LMDeploy's loader maps onto its fused W8A8 experts: int8 weights, ``scale`` ``[out, 1]`` per expert),
  while the router stays in float and is named in ``modules_to_not_convert``, as ``lmdeploy lite smooth_quant``
  writes it (LMDeploy builds the router unquantized).

With ``dequantized_dir`` the tool also writes the same model with the quantized weights expanded back to float
(``(q - zero) * scale``, resp. ``q * scale``): the float model whose logits the quantized one should reproduce.
:func:`load_dequantized_model` builds that model from the quantized checkpoint itself, in any dtype (float32 for an
oracle: the exact products, which a float16 / bfloat16 copy would round), without writing a float copy.

CLI: ``python -m dlinfer.testing.quantize SRC DST --format awq|w8a8 [--group-size 128] [--dequantized DIR]
[--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

# nibble i of an AWQ word holds column AWQ_ORDER[i] of its group of 8 consecutive columns; unpack_awq inverts pack_awq
from dlinfer.vendor.reference.quant import AWQ_ORDER, divide, unpack_awq

FORMATS = ("awq", "w8a8")
AWQ_GROUP_SIZES = (32, 64, 128)
# decoder linears quantized (what LMDeploy builds with the quantization config); embeddings, norms, lm_head stay
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
# MoE experts' linears (W8A8 only: LMDeploy builds no AWQ experts) and, per architecture, the router that stays float
_EXPERT = re.compile(r"^model\.layers\.\d+\.(block_sparse_moe\.experts\.\d+\.w[123]"
                     r"|mlp\.experts\.\d+\.(gate|up|down)_proj)\.weight$")
_ROUTERS = {"MixtralForCausalLM": "block_sparse_moe.gate", "Qwen3MoeForCausalLM": "mlp.gate"}


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` integers in 0..15 -> ``[R, C/8]`` int32 words in AWQ's nibble order."""
    if values.dim() != 2 or values.shape[1] % 8:
        raise ValueError(f"values must be [R, C] with C a multiple of 8, got {tuple(values.shape)}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 15):
        raise ValueError("values must lie in 0..15")
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)
    word = torch.zeros(v.shape[:2], dtype=torch.int64, device=values.device)
    for nibble, column in enumerate(AWQ_ORDER):
        word |= v[:, :, column] << (4 * nibble)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)  # the same 32 bits, signed


__all__ = ["AWQ_GROUP_SIZES", "AWQ_ORDER", "FORMATS", "dequantized_tensors", "fake_quant_kv", "fake_quant_per_token",
           "load_dequantized_model", "main", "pack_awq", "quantize_awq_weight", "quantize_model",
           "quantize_w8a8_weight", "unpack_awq"]


def quantize_awq_weight(weight: torch.Tensor, group_size: int):
    """``weight [out, in]`` -> ``(qweight, qzeros, scales, dequantized [out, in] float32)`` (see the module doc)."""
    out_f, in_f = weight.shape
    if in_f % group_size or out_f % 8:
        raise ValueError(f"a [{out_f}, {in_f}] weight cannot be AWQ-packed with group_size={group_size} (in must be "
                         "a multiple of the group size, out a multiple of 8)")
    w = weight.float().T.reshape(in_f // group_size, group_size, out_f)  # [groups, g, out]
    lo = w.amin(dim=1).clamp(max=0.0)
    hi = w.amax(dim=1).clamp(min=0.0)
    # divide(): correctly rounded on CUDA too (a checkpoint quantized on the GPU is the CPU's, bit for bit)
    scales = divide(hi - lo, 15.0).clamp(min=1e-8).to(torch.float16)  # stored in float16: quantize against it
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(w / s[:, None]) + zeros[:, None]).clamp(0, 15)
    deq = ((q - zeros[:, None]) * s[:, None]).reshape(in_f, out_f).T.contiguous()
    return (pack_awq(q.reshape(in_f, out_f).to(torch.int32)), pack_awq(zeros.to(torch.int32)), scales, deq)


def quantize_w8a8_weight(weight: torch.Tensor):
    """``weight [out, in]`` -> ``(int8 [out, in], float32 scale [out, 1], dequantized [out, in] float32)``."""
    w = weight.float()
    scale = divide(w.abs().amax(dim=1, keepdim=True), 127.0).clamp(min=1e-8)
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale, q.float() * scale


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantized per token (last dim) to int8 and dequantized, in x's dtype: what W8A8 does to a linear's
    input (a float model with this applied before each quantized linear is the W8A8 model's float twin)."""
    from dlinfer.vendor.reference.quant import quantize_per_token

    q, scale = quantize_per_token(x.float(), torch.int8)
    return (q.float() * scale).to(x.dtype)


def fake_quant_kv(x: torch.Tensor, quant_bits: int) -> torch.Tensor:
    """``x [..., D]`` (one row per token and KV head) through a quantized KV cache and back, in x's dtype: what
    ``fill_kv_cache`` stores with ``quant_bits`` 8 / 4 (scales and zeros in x's dtype, as LMDeploy keeps them) and
    the attention ops read. A float model with this applied to its keys (after rotary) and values is the float twin
    of a model served with LMDeploy's ``quant_policy``."""
    from dlinfer.vendor.reference.kv_cache import dequantize, quantize

    q, scale, zero = quantize(x, quant_bits, x.dtype, x.dtype)
    return dequantize(q, scale, zero, quant_bits).to(x.dtype)


def _read(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"src: no *.safetensors file in {src}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


def _write(dst: Path, tensors: dict[str, torch.Tensor], config_update: dict, drop: tuple[str, ...] = ()) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(config_update)
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def quantize_model(src: str | Path, dst: str | Path, fmt: str, *, group_size: int = 128,
                   dequantized_dir: str | Path | None = None,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Write ``src`` (a float Hugging Face model directory) quantized in ``fmt`` to ``dst``.

    ``device``: where each weight is quantized (``cuda`` for real shapes: seconds instead of minutes; the same
    bytes, the arithmetic is elementwise and correctly rounded on every device). Returns the worst relative weight error
    ``|w - dequant(q)| / max|w|`` per format, for the record.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "awq" and group_size not in AWQ_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {AWQ_GROUP_SIZES}, got {group_size}")
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"src: {src} is not a model directory (no config.json)")
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"src: {src} is already quantized ({config['quantization_config'].get('quant_method')})")
    tensors = _read(src)
    quant: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    worst = 0.0
    keep_dtype = torch.float16 if fmt == "awq" else None
    experts = fmt == "w8a8"
    keep_deq = dequantized_dir is not None
    for name in list(tensors):
        t = tensors.pop(name)  # one float weight at a time beside the outputs
        if not (_LINEAR.match(name) or (experts and _EXPERT.match(name))):
            quant[name] = t.to(keep_dtype) if keep_dtype is not None and t.is_floating_point() else t
            if keep_deq:
                deq[name] = quant[name]
            continue
        prefix = name[: -len(".weight")]
        t = t.to(device)
        if fmt == "awq":
            qweight, qzeros, scales, w = quantize_awq_weight(t, group_size)
            quant.update({f"{prefix}.qweight": qweight.cpu(), f"{prefix}.qzeros": qzeros.cpu(),
                          f"{prefix}.scales": scales.cpu()})
        else:
            q, scale, w = quantize_w8a8_weight(t)
            quant.update({name: q.cpu(), f"{prefix}.scale": scale.cpu()})
        if keep_deq:
            deq[name] = w.to(keep_dtype or t.dtype).cpu()
        worst = max(worst, float((t.float() - w).abs().max() / t.float().abs().max().clamp(min=1e-12)))
    if fmt == "awq":
        qcfg = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
        update = {"quantization_config": qcfg, "torch_dtype": "float16", "dtype": "float16"}
    else:
        qcfg = {"quant_method": "smooth_quant", "quant_dtype": "int8"}
        routers = sorted({_ROUTERS[a] for a in config.get("architectures") or [] if a in _ROUTERS})
        if routers:
            qcfg["modules_to_not_convert"] = routers
        update = {"quantization_config": qcfg}
    _copy_side_files(src, dst)
    _write(dst, quant, update)
    if dequantized_dir is not None:
        ddir = Path(dequantized_dir)
        _copy_side_files(src, ddir)
        _write(ddir, deq, {k: v for k, v in update.items() if k != "quantization_config"},
               drop=("quantization_config",))
    return {"max_rel_weight_error": worst}


def _quant_config(qdir: Path) -> tuple[dict, dict]:
    """(config.json, its quantization_config) of a checkpoint this module writes; ValueError otherwise."""
    if not (qdir / "config.json").is_file():
        raise ValueError(f"qdir: {qdir} is not a model directory (no config.json)")
    config = json.loads((qdir / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    method = qcfg.get("quant_method")
    if method == "awq":
        if qcfg.get("bits", 4) != 4 or str(qcfg.get("version", "gemm")).lower() != "gemm" \
                or not qcfg.get("zero_point", True):
            raise ValueError(f"qdir: {qdir}: AWQ is read in 4 bits, GEMM packing, with zero points; got {qcfg}")
    elif method == "smooth_quant":
        if qcfg.get("quant_dtype", "int8") != "int8":
            raise ValueError(f"qdir: {qdir}: SmoothQuant is read in int8; got quant_dtype={qcfg.get('quant_dtype')!r}")
    else:
        raise ValueError(f"qdir: {qdir} holds no AWQ or SmoothQuant checkpoint (quant_method={method!r})")
    return config, qcfg


def dequantized_tensors(qdir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The tensors of the float model that the quantized checkpoint ``qdir`` represents (AWQ GEMM with zero points,
    or SmoothQuant int8 with per-channel scales, as :func:`quantize_model` and LMDeploy's tools write them), one
    ``(name, tensor)`` at a time on ``device`` in ``dtype``, under the float model's names: AWQ's
    ``<p>.qweight / qzeros / scales`` become ``<p>.weight = ((q - zero) * scale)^T``, SmoothQuant's int8
    ``<p>.weight`` with ``<p>.scale`` becomes ``q * scale``, both computed in float32 (AWQ's products are exact
    there, a 4-bit step times a float16 scale; SmoothQuant's are correctly rounded) before the cast to ``dtype``;
    every other floating tensor is cast to ``dtype``."""
    from safetensors import safe_open

    from dlinfer.vendor.reference.quant import awq_dequantize

    qdir = Path(qdir)
    _, qcfg = _quant_config(qdir)
    files = sorted(qdir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"qdir: no *.safetensors file in {qdir}")
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    where = {name: h for h in handles for name in h.keys()}

    def get(name: str) -> torch.Tensor:
        return where[name].get_tensor(name).to(device)

    awq = qcfg["quant_method"] == "awq"
    group_size = int(qcfg.get("group_size", 128))
    for name in where:
        if awq and name.endswith((".qzeros", ".scales")) and name.rsplit(".", 1)[0] + ".qweight" in where:
            continue  # read with their qweight
        if not awq and name.endswith(".scale") and name[: -len(".scale")] + ".weight" in where:
            continue  # read with its weight
        if awq and name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            w = awq_dequantize(get(name), get(prefix + ".scales"), get(prefix + ".qzeros"), group_size)
            yield prefix + ".weight", w.T.contiguous().to(dtype)
            continue
        t = get(name)
        scale_name = name[: -len(".weight")] + ".scale"
        if not awq and name.endswith(".weight") and scale_name in where and not t.is_floating_point():
            yield name, (t.float() * get(scale_name).float()).to(dtype)
        else:
            yield name, t.to(dtype) if t.is_floating_point() else t


@torch.no_grad()
def load_dequantized_model(qdir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """transformers' model of the quantized checkpoint ``qdir`` with its weights dequantized
    (:func:`dequantized_tensors`) into ``dtype`` on ``device``, in eval mode: the function the checkpoint stands
    for, which a float32 oracle scores engines against. Dense models only (transformers fuses MoE experts under
    other names); a tensor the model lacks, or a parameter no tensor fills, is a ValueError."""
    import transformers

    qdir = Path(qdir)
    config_dict, _ = _quant_config(qdir)
    config = transformers.AutoConfig.from_pretrained(str(qdir))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(model.named_parameters())
    missing = set(params)
    for name, t in dequantized_tensors(qdir, dtype, device):
        if name not in params:
            if name == "lm_head.weight" and config_dict.get("tie_word_embeddings"):
                continue
            raise ValueError(f"qdir: tensor {name!r} has no parameter in {type(model).__name__} (MoE experts and "
                             "other architectures transformers renames on load are not read here)")
        if params[name].shape != t.shape:
            raise ValueError(f"qdir: tensor {name!r} is {tuple(t.shape)}, the model's parameter "
                             f"{tuple(params[name].shape)}")
        params[name].copy_(t)
        missing.discard(name)
    if missing:
        raise ValueError(f"qdir: no tensor for the parameters {sorted(missing)[:5]} ({len(missing)} in all)")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlinfer.testing.quantize",
        description="Quantize a float Hugging Face model directory (e.g. one from dlinfer.testing.tiny_models) into "
                    "the AWQ (W4A16, GEMM packing) or LMDeploy SmoothQuant (W8A8) checkpoint format, offline.")
    parser.add_argument("src", nargs="?", help="float model directory (omit with --tiny)")
    parser.add_argument("dst", help="output directory of the quantized model")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--group-size", type=int, default=128, help="AWQ group size (32, 64 or 128)")
    parser.add_argument("--dequantized", metavar="DIR", help="also write the dequantized float model here")
    parser.add_argument("--device", default="cpu", help="where the weights are quantized (e.g. cuda; default cpu)")
    parser.add_argument("--tiny", metavar="ARCH", help="quantize a fresh tiny random-weight model of this "
                                                       "architecture (dlinfer.testing.tiny_models) instead of src")
    args = parser.parse_args(argv)
    src = args.src
    if args.tiny:
        import tempfile

        from dlinfer.testing.tiny_models import build_tiny_model

        src = build_tiny_model(tempfile.mkdtemp(prefix="dlinfer_tiny_"), args.tiny)
    elif not src:
        parser.error("give src, or --tiny ARCH")
    try:
        stats = quantize_model(src, args.dst, args.format, group_size=args.group_size,
                               dequantized_dir=args.dequantized, device=args.device)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {args.format} model to {args.dst} (max relative weight error {stats['max_rel_weight_error']:.4f})")
    if args.dequantized:
        print(f"wrote the dequantized float model to {args.dequantized}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
