"""LMDeploy's PyTorch engine on NVIDIA GPUs, every model layer through ``dlinfer.ops``.

LMDeploy 0.18 ships a dlinfer backend but selects it only for Ascend, MetaX and Cambricon devices. This adapter
routes LMDeploy's ``cuda`` device to :class:`~dlinfer.framework.lmdeploy_ext.backend.DlinferCudaOpsBackend`
(per-step metadata built on the device without host syncs, CUDA graphs with static buffers for dlinfer's
metadata, tensor-parallel workers and the ``api_server`` engine process patched too) and refuses at engine start,
naming them, the features it cannot serve. Served: Llama, Qwen2, Qwen3 (dense) and Qwen3-MoE, Mixtral (MoE), in
float16/bfloat16/float32, eager or with CUDA graphs, tensor parallel over LMDeploy's ``mp`` executor; AWQ (W4A16)
and SmoothQuant (W8A8) checkpoints of the dense models and 8- or 4-bit KV caches (``quant_policy``; see
:mod:`.support` for what is refused).

Install (LMDeploy 0.18 caps torch at 2.12.1; dlinfer never forces torch): ``pip install "dlinfer[triton]"`` next
to LMDeploy, or ``scripts/setup_lmdeploy.sh VENV [--serve]`` for a venv whose torch must not move.

Off by default: installing dlinfer changes nothing in LMDeploy. One step turns it on:

* ``dlinfer serve lmdeploy api_server MODEL [lmdeploy serve api_server options]`` runs
  ``lmdeploy serve api_server MODEL --backend pytorch ...`` on dlinfer (any ``lmdeploy`` command line works after
  ``dlinfer serve lmdeploy``: ``chat MODEL``, ``serve proxy ...``); see :mod:`.cli`;
* ``DLINFER_LMDEPLOY=1`` for unchanged scripts (``lmdeploy.pipeline``) and ``lmdeploy serve ...`` command lines,
  once ``python -m dlinfer.framework.lmdeploy_ext install-hook`` has installed the start-up hook (:mod:`.hook`;
  ``uninstall-hook`` removes it, ``hook-status`` reports);
* in code, before building the pipeline::

      import dlinfer.framework.lmdeploy_ext as dlinfer_lmdeploy
      dlinfer_lmdeploy.apply()
      pipe = lmdeploy.pipeline(MODEL, backend_config=lmdeploy.PytorchEngineConfig(tp=2))

:func:`revert` turns it off again in the current process. Importing this package does not import LMDeploy.
Which vendor serves each op follows dlinfer's registry (``DLINFER_VENDOR=...`` forces one; ``dlinfer info``).
"""

from dlinfer.framework.lmdeploy_ext.patch import apply, is_applied, revert

ENV_VAR = "DLINFER_LMDEPLOY"

__all__ = ["ENV_VAR", "apply", "is_applied", "revert"]
