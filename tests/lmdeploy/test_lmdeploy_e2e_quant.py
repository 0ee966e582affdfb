"""benchmarks/lmdeploy_e2e.py's quantized runs on the CPU: the flags and their refusals, the quantized model build and
its cache, the dequantizing float32 oracle (against LMDeploy's own computation on the quantized checkpoint), and
--pass-seconds' request count handed from a model's first run to the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# the script loaded as a module (the e2e fixture), its path, the greedy reference
from test_lmdeploy_e2e_script import SCRIPT, e2e, greedy_tokens  # noqa: F401


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A tiny float32 Llama (LMDeploy on the CPU asks CUDA about bfloat16 checkpoints) quantized to AWQ (group 32,
    float16) and W8A8 (float32), and a bfloat16 one to W8A8, each with quantize_model's dequantized copy."""
    from dlinfer.testing.quantize import quantize_model
    from dlinfer.testing.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("e2e_quant")
    src = build_tiny_model(root / "src", "llama")
    for fmt in ("awq", "w8a8"):
        quantize_model(src, root / fmt, fmt, group_size=32, dequantized_dir=root / f"{fmt}_deq")
    bf16 = build_tiny_model(root / "src_bf16", "llama", dtype=torch.bfloat16)
    quantize_model(bf16, root / "w8a8_bf16", "w8a8", dequantized_dir=root / "w8a8_bf16_deq")
    return root


# ------------------------------------------------------------------------------------------- flags, refusals
@pytest.mark.parametrize("quant,kv,fragment", [("awq", "8", "AWQ W4A16 (4-bit weights, group 128"),
                                               ("w8a8", "0", "SmoothQuant W8A8"), ("none", "8", "int8 KV cache")])
def test_dry_run_with_the_quant_flags(tmp_path, quant, kv, fragment):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--model", "llama8b", "--layers", "8",
                           "--quant", quant, "--kv-quant", kv, "--mode", "graph", "--timed-passes", "3",
                           "--pass-seconds", "15", "--oracle-prompts", "8", "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"--quant {quant}, --kv-quant {kv}" in done.stdout and fragment in done.stdout
    assert "Llama-3-8B shape with 8 of 32 decoder layers" in done.stdout
    if quant != "none":
        assert "weights dequantized" in done.stdout
    if kv == "8":
        assert "the int8 KV cache is the engines' error" in done.stdout


@pytest.mark.parametrize("argv,fragment", [
    (["--kv-quant", "4"], "--kv-quant 4: dlinfer sends paged prefill over a 4-bit KV cache on CUDA to its reference"),
    (["--kv-quant", "16"], "--kv-quant must be one of [0, 8]"),
    (["--quant", "awq", "--model", "qwen3moe"], "--quant awq: LMDeploy builds no AWQ experts"),
    (["--quant", "awq", "--model", "all"], "MoE models (qwen3moe, mixtral)"),
    (["--quant", "w8a8", "--model", "qwen3moe"], "--quant w8a8 with qwen3moe: LMDeploy 0.18 itself cannot run"),
    (["--quant", "w8a8", "--model", "mixtral"], "--oracle-prompts 0 runs it without the oracle"),
    (["--quant", "gptq"], "argument --quant: invalid choice: 'gptq'"),
    (["--pass-seconds", "-1"], "--pass-seconds must be >= 0"),
    (["--timed-passes", "0"], "--timed-passes must be >= 1"),
])
def test_bad_combinations_are_refused_naming_the_flag(e2e, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--dry-run", *argv])
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_what_is_served(e2e):
    assert e2e.quant_refusal(["llama8b"], "awq", 8) is None
    assert e2e.quant_refusal(["llama8b"], "w8a8", 0) is None
    assert e2e.quant_refusal(["mixtral"], "w8a8", 8, oracle=False) is None  # W8A8 Mixtral without the oracle
    assert e2e.quant_refusal(["qwen3moe", "mixtral"], "none", 8) is None
    assert e2e.main(["--dry-run", "--model", "mixtral", "--quant", "w8a8", "--oracle-prompts", "0"]) == 0


# ---------------------------------------------------------------------------------------------- pass seconds
def test_timed_request_count(e2e):
    # 256 requests in 4 s (compilations left out) -> 64 requests/s -> 960 for a 15 s pass
    assert e2e.timed_request_count(256, 256, 4.0, 15.0) == 960
    assert e2e.timed_request_count(256, 256, 40.0, 15.0) == 256  # never fewer than --requests
    assert e2e.timed_request_count(256, 16, 0.01, 15.0) == 64 * 256  # capped
    assert e2e.timed_request_count(256, 256, 4.0, 0.0) == 256  # off
    assert e2e.timed_request_count(256, 256, 0.0, 15.0) == 256  # no rate to go by
    assert e2e.workload(700, 5, 9, 0, 50)[:256] == e2e.workload(256, 5, 9, 0, 50)  # longer lists start the same


def test_orchestration_hands_the_quant_and_the_timed_count_to_every_run(e2e, tmp_path, monkeypatch):
    """main() with --quant/--kv-quant/--pass-seconds (fake runs): the first run's timed request count goes to
    the later runs of the model, every spec carries the quantization, the oracle job the dequantizing loader's
    settings; the table shows each run's requests and pass spread."""
    built = []
    monkeypatch.setattr(e2e, "build_model", lambda key, layers, model_dir, log: tmp_path / f"{key}_{layers}l")
    monkeypatch.setattr(e2e, "quantized_model",
                        lambda src, quant, log: built.append((src.name, quant)) or src.parent / f"{src.name}_{quant}")
    monkeypatch.setattr(e2e, "environment", lambda: {"date": "today", "argv": []})
    specs, jobs = [], []

    def fake_run(command, timeout):
        if "--oracle-child" in command:
            job = json.loads(Path(command[command.index("--oracle-child") + 1]).read_text())
            jobs.append(job)
            row = {"prompts": 2, "positions": 8, "match_rate": 1.0, "first_token_match": 1.0, "mismatches": 0,
                   "mismatch_deficit_median": 0.0, "mismatch_deficit_max": 0.0, "gap_median": 0.4}
            Path(job["result_path"]).write_text(json.dumps({"runs": {n: row for n in job["runs"]}, "oracle_s": 1}))
            return 0, ""
        spec = json.loads(command[command.index("--child") + 1])
        specs.append(spec)
        count = spec["timed_requests"] or 12  # the first run sizes its passes: 12 requests
        result = {"output_tok_s": 100.0, "total_tok_s": 300.0, "mean_ttft_s": 0.1, "mean_tpot_s": 0.01,
                  "duration_s": 15.2, "startup_s": 2.0, "warmup_s": 5.0, "timed_requests": count,
                  "pass_output_tok_s": [99.0, 100.0, 100.5], "pass_spread": 0.015, "pass_spread_after_first": 0.005,
                  "first_tokens": [[7] * spec["compare_tokens"] for _ in range(count)]}
        Path(spec["result_path"]).write_text(json.dumps(result))
        return 0, ""

    monkeypatch.setattr(e2e, "run_isolated", fake_run)
    out = tmp_path / "out" / "r.json"
    code = e2e.main(["--model", "llama8b", "--layers", "2", "--quant", "awq", "--kv-quant", "8", "--mode", "both",
                     "--requests", "4", "--new-tokens", "8", "--compare-tokens", "4", "--timed-passes", "3",
                     "--pass-seconds", "15", "--oracle-prompts", "2", "--model-dir", str(tmp_path), "--out", str(out)])
    assert code == 0
    assert built == [("llama8b_2l", "awq")]
    assert [s["timed_requests"] for s in specs] == [None, 12, 12, 12]
    assert all(s["quant"] == "awq" and s["kv_quant"] == 8 and s["pass_seconds"] == 15.0 for s in specs)
    assert all(s["model_dir"].endswith("llama8b_2l_awq") for s in specs)
    assert len({s["result_path"] for s in specs}) == 4 and all("_awq_kv8_" in s["result_path"] for s in specs)
    (job,) = jobs
    assert job["quant"] == "awq" and job["engine_dtype"] == "float16" and job["model_dir"].endswith("_awq")
    assert len(job["prompts"]) == 2 and all(len(t) == 2 for t in job["runs"].values())
    report = json.loads(out.read_text())
    assert report["quant"]["weights"] == "awq" and report["quant"]["kv_quant"] == 8
    assert "AWQ W4A16" in report["models"]["llama8b"] and "int8 KV cache" in report["models"]["llama8b"]
    assert any("12 requests per timed pass" in line for line in report["log"])
    table = (out.parent / "lmdeploy_e2e.md").read_text()
    row = "| llama8b/dlinfer/graph/tp1 | 100 | 300 | 100 | 10.00 | 1.000 | not counted | 12, 0.5% (2 passes) |"
    assert row in table
    assert "Float32 oracle (llama8b): float32 transformers with the checkpoint's weights dequantized" in table
    printed = e2e.table(report["runs"], report["agreement"])
    assert "0.5% (2 passes)" in printed


# ------------------------------------------------------------------------------------ the quantized model build
def test_quantized_model_is_built_once_and_cached(e2e, tmp_path, monkeypatch):
    from dlinfer.testing.tiny_models import build_tiny_model

    src = Path(build_tiny_model(tmp_path / "llama8b_2l", "llama", dtype=torch.bfloat16))
    (tmp_path / "llama8b_2l_awq.partial").mkdir()  # what a cut build leaves
    logged = []
    path = e2e.quantized_model(src, "awq", logged.append)
    assert path == tmp_path / "llama8b_2l_awq" and not (tmp_path / "llama8b_2l_awq.partial").exists()
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128,
                                             "zero_point": True, "version": "gemm"}
    stats = json.loads((path / "dlinfer_quantized.json").read_text())
    assert stats["format"] == "awq" and stats["device"] == "cpu" and 0 < stats["max_rel_weight_error"] < 0.2
    assert any("done in" in line for line in logged)
    monkeypatch.setattr(e2e.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert e2e.quantized_model(src, "awq", logged.append) == path and "reusing" in logged[-1]


# ------------------------------------------------------------------------------------ the dequantizing oracle
def _fake_quant_inputs(model) -> None:
    """Quantize each decoder linear's input per token to int8 and back, as W8A8 engines do."""
    from dlinfer.testing.quantize import fake_quant_per_token

    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            module.register_forward_pre_hook(lambda mod, args: (fake_quant_per_token(args[0]), *args[1:]))


@pytest.mark.lmdeploy
@pytest.mark.parametrize("fmt", ["awq", "w8a8"])
def test_dequantized_model_is_the_function_lmdeploy_computes_from_the_checkpoint(fmt, quantized, patched):
    """load_dequantized_model: in the checkpoint's float dtype the same weights, bit for bit, as quantize_model's
    dequantized copy; in float32 the logits LMDeploy's own loader and layers compute from the quantized
    checkpoint (reference vendor): AWQ within LMDeploy's float16 rounding (5e-3), W8A8 in float32 with the
    activations quantized the same way within float32 rounding (1e-3); the unquantized model is much farther."""
    import transformers
    from lmdeploy_harness import PagedModel

    from dlinfer.testing.quantize import load_dequantized_model
    from dlinfer.vendor import registry

    qdir = quantized / fmt
    for name, stored in ((fmt, torch.float16 if fmt == "awq" else torch.float32),
                         *((("w8a8_bf16", torch.bfloat16),) if fmt == "w8a8" else ())):
        same = load_dequantized_model(quantized / name, stored).state_dict()
        copy = transformers.AutoModelForCausalLM.from_pretrained(quantized / f"{name}_deq", dtype=stored)
        copy = copy.state_dict()
        assert set(same) == set(copy) and all(torch.equal(same[k], copy[k]) for k in copy), name
        assert same["model.layers.0.self_attn.q_proj.weight"].dtype == stored

    oracle = load_dequantized_model(qdir)
    assert oracle.model.layers[0].mlp.down_proj.weight.dtype == torch.float32 and not oracle.training
    if fmt == "w8a8":
        _fake_quant_inputs(oracle)
    tokens = torch.randint(4, 500, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    with registry.pinned("reference"):
        pm = PagedModel(str(qdir), dtype={"awq": "auto", "w8a8": "float32"}[fmt])
        got = pm.step([pm.new_sequence(tokens)], [len(tokens)]).float()
    with torch.inference_mode():
        want = oracle(torch.tensor([tokens])).logits[0].float()
        unquantized = transformers.AutoModelForCausalLM.from_pretrained(quantized / "src", dtype=torch.float32)(
            torch.tensor([tokens])).logits[0].float()
    err = float((got - want).norm() / want.norm())
    assert err <= {"awq": 5e-3, "w8a8": 1e-3}[fmt], err
    assert float((got - unquantized).norm() / unquantized.norm()) > 10 * err


def test_dequantizing_loader_refuses_what_it_cannot_read(quantized, tmp_path):
    from dlinfer.testing.quantize import dequantized_tensors, load_dequantized_model

    with pytest.raises(ValueError, match="qdir: .* holds no AWQ or SmoothQuant checkpoint"):
        load_dequantized_model(quantized / "src")
    with pytest.raises(ValueError, match="no config.json"):
        next(dequantized_tensors(tmp_path))
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((quantized / "awq" / "config.json").read_text())
    tensors = load_file(str(quantized / "awq" / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"no tensor for the parameters \['model.norm.weight'\]"):
        load_dequantized_model(broken)


def test_float32_oracle_child_scores_against_the_dequantized_model(e2e, quantized, tmp_path):
    """run_oracle on an AWQ checkpoint: greedy tokens of the dequantized float32 model match everywhere, other
    tokens nowhere; the yardstick runs in float16 (LMDeploy's AWQ dtype) and says so."""
    from dlinfer.testing.quantize import load_dequantized_model

    model = load_dequantized_model(quantized / "awq")
    prompts = e2e.workload(3, 5, 12, 0, 200)
    greedy = greedy_tokens(model, prompts, 5)
    corrupted = [[(t + 1) % 200 for t in g] for g in greedy]
    job = {"model_dir": str(quantized / "awq"), "arch": "llama3-8b", "quant": "awq", "engine_dtype": "float16",
           "prompts": prompts, "runs": {"m/stock/graph/tp1": greedy, "m/dlinfer/graph/tp1": corrupted},
           "result_path": str(tmp_path / "oracle.json")}
    e2e.run_oracle(job)
    out = json.loads((tmp_path / "oracle.json").read_text())["runs"]
    assert out["m/stock/graph/tp1"]["match_rate"] == 1.0
    assert out["m/dlinfer/graph/tp1"]["match_rate"] == 0.0 and out["m/dlinfer/graph/tp1"]["mismatch_deficit_median"] > 0
    yardstick = out["transformers fp16 (on m/stock/graph/tp1's tokens)"]
    assert yardstick["positions"] == 15 and 0.5 <= yardstick["match_rate"] <= 1.0


def _eager_logits(qdir: Path, tokens: list[list[int]], kv: int, prefill: list[int], schedule) -> list[torch.Tensor]:
    """Per sequence, the logits of every position that the graph test's steps produce, from eager steps of the same
    engine (same prefill, same decode batches) instead of graph replays."""
    from lmdeploy_harness import PagedModel

    pm = PagedModel(str(qdir), block_size=16, num_blocks=48, quant_policy=kv)
    seqs = [pm.new_sequence(t) for t in tokens]
    rows: list[list[torch.Tensor]] = [list(chunk) for chunk in pm.step(seqs, prefill).split(prefill)]
    for live in schedule:
        for row, logits in zip(live, pm.step([seqs[i] for i in live], [1] * len(live))):
            rows[row].append(logits)
    return [torch.stack(r) for r in rows]


@pytest.mark.lmdeploy
@pytest.mark.parametrize("fmt,kv", [("awq", 0), ("w8a8", 0), ("awq", 8), ("w8a8", 8)])
def test_quantized_checkpoint_decodes_through_dlinfers_graph_runner(fmt, kv, quantized, patched):
    """What ``--quant ... --mode graph`` runs, emulated on the CPU (tests/lmdeploy/test_lmdeploy_graph.py's
    capture-once / replay emulation): decode steps of the quantized checkpoint replayed through dlinfer's graph
    runner, padded rows included. Float cache: against the dequantized float32 model (W8A8: activations quantized
    the same way), within LMDeploy's float16 rounding for AWQ, float32 rounding for W8A8. int8 cache (quant_policy
    8): against eager steps of the same engine over the same schedule (the replays must not change a logit beyond
    float rounding; the cache's own error is test_lmdeploy_quant.py's). Measured: AWQ 5.4e-3 / 9.8e-4 (one float16
    ulp), W8A8 2.9e-6 / 0, on logits up to 3.5."""
    pytest.importorskip("triton", reason="LMDeploy's CUDA graph runner imports its Triton kernels")
    from test_lmdeploy_graph import FULL_THEN_SHRINK, PREFILL, _decode_through_graph, _tokens

    from dlinfer.framework.lmdeploy_ext.graph import DlinferSingleGraphRunner
    from dlinfer.testing.quantize import load_dequantized_model

    qdir = quantized / fmt
    tokens = [_tokens(11, 20), _tokens(12, 21), _tokens(13, 16)]
    if kv:
        refs = _eager_logits(qdir, tokens, kv, PREFILL, FULL_THEN_SHRINK)
        tol = {"awq": 1e-3, "w8a8": 1e-5}[fmt]  # AWQ: a float16 ulp where padding changes a GEMM's shape
    else:
        oracle = load_dequantized_model(qdir)
        if fmt == "w8a8":
            _fake_quant_inputs(oracle)
        with torch.inference_mode():
            refs = [oracle(torch.tensor([t])).logits[0].float() for t in tokens]
        tol = {"awq": 5e-3, "w8a8": 1e-5}[fmt]
    worst, replays, pm, _ = _decode_through_graph(DlinferSingleGraphRunner, str(qdir), refs, tokens,
                                                  quant_policy=kv)
    scale = max(float(r.abs().max()) for r in refs)
    assert replays == 5
    assert worst <= tol * scale, (worst, scale)


def test_quantizing_on_the_gpu_writes_the_cpus_bytes():
    """quantize_model(device="cuda") (what the benchmark does) must write what the CPU writes: the weight
    quantizers divide by numbers through reference.quant.divide, because torch's CUDA ``tensor / number`` multiplies
    by the float32 reciprocal (emulated on the CPU by tests/triton/cuda_torch_arith.py), which moves some float32
    scales by a bit -- shown here on the plain expression the quantizers avoid."""
    import importlib.util

    from dlinfer.testing.quantize import quantize_awq_weight, quantize_w8a8_weight

    spec = importlib.util.spec_from_file_location(
        "cuda_torch_arith", Path(__file__).resolve().parents[1] / "triton" / "cuda_torch_arith.py")
    arith = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arith)
    w = (torch.randn(512, 1024, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    cpu = quantize_awq_weight(w, 128) + quantize_w8a8_weight(w)
    with arith.cuda_scalar_division():
        cuda = quantize_awq_weight(w, 128) + quantize_w8a8_weight(w)
        plain = w.float().abs().amax(dim=1, keepdim=True) / 127.0
    assert all(torch.equal(a, b) for a, b in zip(cpu, cuda))
    assert not torch.equal(plain, w.float().abs().amax(dim=1, keepdim=True) / 127.0), "the emulation did not bite"
