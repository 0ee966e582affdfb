"""LMDeploy's PyTorch engine on NVIDIA GPUs, every model layer through ``dlinfer.ops``.

LMDeploy 0.18 ships a dlinfer backend but selects it only for Ascend, MetaX and Cambricon devices. This adapter
routes LMDeploy's ``cuda`` device to :class:`~dlinfer.framework.lmdeploy_ext.backend.DlinferCudaOpsBackend`
(per-step metadata built on the device, CUDA graphs with static buffers for dlinfer's metadata, tensor-parallel
workers patched too) and refuses at engine start what it cannot serve.

Off by default: installing dlinfer changes nothing in LMDeploy. Three ways to turn it on:

* ``dlinfer serve lmdeploy api_server MODEL [any lmdeploy serve api_server options]`` (or any other ``lmdeploy``
  command line after ``dlinfer serve lmdeploy``): :func:`dlinfer.framework.lmdeploy_ext.cli.main`;
* ``DLINFER_LMDEPLOY=1`` for unchanged scripts and ``lmdeploy serve ...`` command lines, once
  ``python -m dlinfer.framework.lmdeploy_ext install-hook`` has installed the start-up hook (``hook.py``);
* in code: ``import dlinfer.framework.lmdeploy_ext as dl; dl.apply()`` before building the pipeline.

:func:`revert` turns it off again in the current process. Importing this package does not import LMDeploy.
"""

from dlinfer.framework.lmdeploy_ext.patch import apply, is_applied, revert

ENV_VAR = "DLINFER_LMDEPLOY"

__all__ = ["ENV_VAR", "apply", "is_applied", "revert"]
