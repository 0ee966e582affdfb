"""Routing LMDeploy's CUDA device to dlinfer: selector patch, revert, spawned workers, refusal at engine start."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle

import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy is not installed (scripts/setup_lmdeploy.sh installs it)")

from dlinfer.errors import NotSupportedError  # noqa: E402

pytestmark = pytest.mark.lmdeploy


def test_apply_routes_cuda_and_revert_restores():
    import dlinfer.framework.lmdeploy_ext as ext
    from dlinfer.framework.lmdeploy_ext.backend import DlinferCudaOpsBackend
    from lmdeploy.pytorch.backends import get_backend

    was = ext.is_applied()
    ext.revert()
    try:
        assert get_backend("cuda").__name__ == "CudaOpsBackend"
        ext.apply()
        ext.apply()  # idempotent
        assert ext.is_applied()
        assert get_backend("cuda") is DlinferCudaOpsBackend
        assert get_backend() is DlinferCudaOpsBackend  # the default device type is cuda
        assert get_backend("maca").__name__ == "MacaOpsBackend"  # other devices keep LMDeploy's choice
        assert not DlinferCudaOpsBackend.support_ray(), "tp>1 must stay on the mp executor that dlinfer patches"
        ext.revert()
        assert not ext.is_applied()
        assert get_backend("cuda").__name__ == "CudaOpsBackend"
    finally:
        (ext.apply if was else ext.revert)()


def test_patch_reaches_a_spawned_worker(patched, tmp_path):
    from lmdeploy_worker_probe import ProbeProc

    out = tmp_path / "probe.json"
    proc = ProbeProc(0, mp.get_context("spawn"))
    proc.start(out_path=str(out))
    proc._proc.join(120)
    assert proc._proc.exitcode == 0, f"worker exited with {proc._proc.exitcode}"
    report = json.loads(out.read_text())
    assert report == {"applied": True, "backend": "DlinferCudaOpsBackend"}


def test_engine_process_entry_is_dlinfers(patched):
    """``lmdeploy serve api_server`` runs the engine in a spawned process: its target must re-apply the patch."""
    from lmdeploy.pytorch.engine.mp_engine.zmq_engine import ZMQMPEngine

    target = pickle.dumps(ZMQMPEngine._mp_proc)
    assert b"dlinfer.framework.lmdeploy_ext.patch" in target and b"_mp_engine_entry" in target


def _config_dir(tmp_path, tiny_model, arch, **changes):
    src = json.loads(open(f"{tiny_model(arch)}/config.json").read())
    src.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(src))
    return str(tmp_path)


def test_engine_start_refuses_unsupported_features_naming_them(patched, tmp_path, tiny_model):
    import lmdeploy.pytorch.engine.engine as engine_module
    from lmdeploy.pytorch.config import CacheConfig, DistConfig

    path = _config_dir(tmp_path, tiny_model, "qwen2", use_sliding_window=True, sliding_window=64)
    cache = CacheConfig(max_batches=8, block_size=64, num_cpu_blocks=0, num_gpu_blocks=0, quant_policy=16)
    with pytest.raises(NotSupportedError) as info:
        engine_module.build_executor(path, cache_config=cache, backend_config=None, dist_config=DistConfig(),
                                     misc_config=None, adapters={"my_lora": "/x"})
    message = str(info.value)
    for feature in ("sliding-window attention", "KV-cache quantization quant_policy=16", "LoRA adapters (my_lora)"):
        assert feature in message


def test_supported_models_pass_the_check(tiny_model):
    import transformers

    from dlinfer.framework.lmdeploy_ext.support import check_supported, model_features

    for arch in ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"):
        config = transformers.AutoConfig.from_pretrained(tiny_model(arch))
        assert model_features(config) == [], arch
        check_supported(config, cache_config=None, dist_config=None)
    gemma = transformers.GemmaConfig()
    gemma.architectures = ["Gemma2ForCausalLM"]
    gemma.attn_logit_softcapping = 50.0
    reasons = model_features(gemma)
    assert any("architecture Gemma2ForCausalLM" in r for r in reasons)
    assert any("soft-capping" in r for r in reasons)
    assert any("quant_method='gptq'" in r for r in model_features({"architectures": ["LlamaForCausalLM"],
                                                                   "quantization_config": {"quant_method": "gptq"}}))
    for method in ("awq", "smooth_quant"):  # served (tests/lmdeploy/test_lmdeploy_quant.py)
        assert model_features({"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": method}}
                              ) == []


def test_engine_feature_refusals_name_each_feature():
    from types import SimpleNamespace

    from dlinfer.framework.lmdeploy_ext.support import check_supported, engine_features

    assert engine_features() == []
    reasons = engine_features(cache_config=SimpleNamespace(quant_policy=42), adapters={"a": "/x", "b": "/y"},
                              specdecode_config=object(), dist_config=SimpleNamespace(dp=2, ep=4),
                              misc_config=SimpleNamespace(model_format="fp8"), dtype="float8",
                              backend_config=SimpleNamespace(device_type="ascend"))
    expected = ["quant_policy=42", "LoRA adapters (a, b)", "speculative decoding", "data parallelism (dp=2)",
                "expert parallelism (ep=4)", "model_format='fp8'", "dtype='float8'", "device_type='ascend'"]
    assert len(reasons) == len(expected)
    for reason, fragment in zip(reasons, expected):
        assert fragment in reason
    with pytest.raises(NotSupportedError, match="speculative decoding.*DLINFER_LMDEPLOY"):
        check_supported(None, specdecode_config=object())
    assert engine_features(dtype="bfloat16", dist_config=SimpleNamespace(dp=1, ep=1)) == []
    for policy in (4, 8):  # integer KV caches are served
        assert engine_features(cache_config=SimpleNamespace(quant_policy=policy),
                               misc_config=SimpleNamespace(model_format="awq")) == []


def test_pipeline_entry_refuses_before_any_engine_starts(patched, tmp_path, tiny_model):
    """``Engine.from_pretrained`` (lmdeploy.pipeline, lmdeploy serve) checks in the calling process, even when
    the engine would run in its own process (``enable_mp_engine``, as ``lmdeploy serve api_server`` sets it)."""
    from lmdeploy import PytorchEngineConfig
    from lmdeploy.pytorch.engine.engine import Engine

    path = _config_dir(tmp_path, tiny_model, "llama", quantization_config={"quant_method": "gptq"})
    config = PytorchEngineConfig(quant_policy=16, ep=2, enable_mp_engine=True)
    with pytest.raises(NotSupportedError) as info:
        Engine.from_pretrained(path, engine_config=config)
    for feature in ("quant_method='gptq'", "quant_policy=16", "expert parallelism (ep=2)"):
        assert feature in str(info.value)


def test_revert_restores_the_engine_entry_points():
    import dlinfer.framework.lmdeploy_ext as ext
    import lmdeploy.pytorch.engine.engine as engine_module
    from lmdeploy.pytorch.engine.mp_engine.zmq_engine import ZMQMPEngine

    was = ext.is_applied()
    ext.revert()
    try:
        stock = (engine_module.Engine.__dict__["from_pretrained"], engine_module.build_executor,
                 ZMQMPEngine.__dict__["_mp_proc"].__func__)
        ext.apply()
        assert engine_module.Engine.__dict__["from_pretrained"] is not stock[0]
        ext.revert()
        assert (engine_module.Engine.__dict__["from_pretrained"], engine_module.build_executor,
                ZMQMPEngine.__dict__["_mp_proc"].__func__) == stock
    finally:
        (ext.apply if was else ext.revert)()


def _tp2_dist_checker(model_path: str):
    """An EngineChecker for CUDA at tp = 2 (executor left to LMDeploy) that runs only the distributed check."""
    from lmdeploy import PytorchEngineConfig
    from lmdeploy.pytorch.check_env.dist import DistChecker
    from lmdeploy.pytorch.engine.engine_checker import EngineChecker

    config = PytorchEngineConfig(tp=2, max_batch_size=8, device_type="cuda")
    checker = EngineChecker(model_path=model_path, engine_config=config)
    # Triton/torch/model checks need a GPU; the distributed check is the one that depends on the backend.
    checker._required_checker = [c for c in checker._required_checker if isinstance(c, DistChecker)]
    assert len(checker._required_checker) == 1
    return checker


def test_engine_checks_in_lmdeploys_spawned_process_see_dlinfers_backend(tiny_model, monkeypatch):
    """On CUDA, LMDeploy runs EngineChecker in a freshly spawned process. Unpatched, that process sees the stock
    CUDA backend, picks ray for tp = 2 and stops the engine ("Multi-nodes support requires `ray`"), as it did on the
    two-GPU machine; with dlinfer applied, the spawned process applies the patch first and picks mp."""
    pytest.importorskip("lmdeploy")
    try:
        import ray  # noqa: F401

        pytest.skip("ray is installed: the stock CUDA backend's choice of ray would pass the check")
    except ImportError:
        pass
    import dlinfer.framework.lmdeploy_ext as ext
    from lmdeploy.pytorch import envs

    monkeypatch.setattr(envs, "enable_check_env", True)
    was = ext.is_applied()
    ext.revert()
    try:
        with pytest.raises(SystemExit):
            _tp2_dist_checker(tiny_model("llama")).handle()  # stock: the spawned checker has no dlinfer
        ext.apply()
        _tp2_dist_checker(tiny_model("llama")).handle()  # passes: the spawned checker picked mp
    finally:
        (ext.apply if was else ext.revert)()


def test_revert_restores_the_engine_checker():
    import dlinfer.framework.lmdeploy_ext as ext
    from lmdeploy.pytorch.engine.engine_checker import EngineChecker

    was = ext.is_applied()
    ext.revert()
    try:
        stock = EngineChecker.handle
        ext.apply()
        assert EngineChecker.handle is not stock
        ext.revert()
        assert EngineChecker.handle is stock
    finally:
        (ext.apply if was else ext.revert)()
