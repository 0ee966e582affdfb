"""Run LMDeploy's patched models on the CPU through dlinfer's LMDeploy backend, without LMDeploy's engine.

The engine needs CUDA (streams, the scheduler's events), LMDeploy's models do not. ``PagedModel`` builds a model
with LMDeploy's own ``build_patched_model`` and weight loader, keeps a paged KV cache of LMDeploy's layout, and
runs steps through LMDeploy's ``StepContext`` (``ModelInputs`` -> ``build_context``), i.e. through
``DlinferCudaOpsBackend.update_step_context`` and LMDeploy's dlinfer layers, to ``dlinfer.ops``.
"""

from __future__ import annotations

import dataclasses
import random

import torch


@dataclasses.dataclass
class Sequence:
    tokens: list[int]
    blocks: list[int]
    cached: int = 0  # tokens already in the KV cache


class PagedModel:
    """One LMDeploy patched model on the CPU with a paged cache of ``num_blocks`` x ``block_size``."""

    def __init__(self, model_path: str, *, block_size: int = 16, num_blocks: int = 64, dtype: str = "float32",
                 seed: int = 0, dist_config=None, quant_policy: int = 0):
        from lmdeploy.pytorch.config import CacheConfig, MiscConfig, ModelConfig
        from lmdeploy.pytorch.model_inputs import BuildModelContext
        from lmdeploy.pytorch.models.patch import build_patched_model
        from lmdeploy.pytorch.strategies import build_strategy_factory
        from lmdeploy.pytorch.weight_loader.model_weight_loader import load_model_weights

        self.block_size = block_size
        self.num_blocks = num_blocks
        self.model_config = ModelConfig.from_pretrained(model_path, dtype=dtype, block_size=block_size,
                                                        dist_config=dist_config)
        self.cache_config = CacheConfig(max_batches=8, block_size=block_size, num_cpu_blocks=0,
                                        num_gpu_blocks=num_blocks, quant_policy=quant_policy)
        self.model = build_patched_model(self.model_config, device=torch.device("cpu"),
                                         build_model_ctx=BuildModelContext(
                                             strategy_factory=build_strategy_factory(self.model_config,
                                                                                     MiscConfig()),
                                             quant_config=self.model_config.quant_config))  # as the engine does
        load_model_weights(self.model, model_path, device=torch.device("cpu"))
        cfg = self.model_config
        if quant_policy:
            self.kv_caches = self._engine_caches(dist_config)
        else:
            _, heads = cfg.get_num_qkv_head_by_tp()  # this rank's KV heads (all of them without tensor parallelism)
            head_dim = cfg.head_dim
            v_head_dim = getattr(cfg, "v_head_dim", None) or head_dim
            self.kv_caches = [
                [torch.zeros(num_blocks, block_size, heads, head_dim, dtype=cfg.dtype),
                 torch.zeros(num_blocks, block_size, heads, v_head_dim, dtype=cfg.dtype)]
                for _ in range(cfg.num_layers)
            ]
        self._free = list(range(num_blocks))
        random.Random(seed).shuffle(self._free)  # shuffled, non-contiguous block tables

    def _engine_caches(self, dist_config) -> list[list[torch.Tensor]]:
        """Each layer's caches as LMDeploy's cache engine lays them out (its cache specs, through the selected
        backend's block shapes): with a quantized cache, uint8 K/V and one [..., 2] scale/zero tensor per cache."""
        from lmdeploy.pytorch.engine.cache_engine.schema import build_model_block_cache_tensor_specs

        world = dist_config.attn_tp if dist_config is not None else 1
        specs = build_model_block_cache_tensor_specs(self.model_config, self.cache_config, world)
        return [[torch.zeros(self.num_blocks, *spec.desc.shape, dtype=spec.desc.dtype) for spec in specs]
                for _ in range(self.model_config.num_layers)]

    def new_sequence(self, tokens: list[int]) -> Sequence:
        return Sequence(tokens=list(tokens), blocks=[])

    def _ensure_blocks(self, seq: Sequence, length: int) -> None:
        need = -(-length // self.block_size)
        while len(seq.blocks) < need:
            if not self._free:
                raise RuntimeError("out of cache blocks")
            seq.blocks.append(self._free.pop())

    def make_inputs(self, seqs: list[Sequence], q_lens: list[int]):
        """LMDeploy ``ModelInputs`` for one step: ``q_lens[i]`` new tokens of ``seqs[i]``."""
        from lmdeploy.pytorch.model_inputs import ModelInputs

        token_ids, history, kv_lens = [], [], []
        for seq, q in zip(seqs, q_lens):
            if q < 1 or seq.cached + q > len(seq.tokens):
                raise ValueError(f"bad step: {q} new tokens after {seq.cached} of {len(seq.tokens)}")
            self._ensure_blocks(seq, seq.cached + q)
            token_ids += seq.tokens[seq.cached:seq.cached + q]
            history.append(seq.cached)
            kv_lens.append(seq.cached + q)
        width = max(len(s.blocks) for s in seqs)
        table = torch.zeros(len(seqs), width, dtype=torch.int64)
        for i, seq in enumerate(seqs):
            table[i, :len(seq.blocks)] = torch.tensor(seq.blocks)
        is_decoding = all(q == 1 for q in q_lens) and all(s.cached > 0 for s in seqs)
        return ModelInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.int64)[None],
            seq_length=torch.tensor(q_lens, dtype=torch.int64),
            history_lengths=torch.tensor(history, dtype=torch.int64),
            block_offsets=table,
            is_decoding=is_decoding,
            num_ignored_history=torch.zeros(len(seqs), dtype=torch.int64),
            max_q_seqlen=max(q_lens),
            max_kv_seqlen=max(kv_lens),
            sum_kv_seqlen=sum(kv_lens),
        )

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], q_lens: list[int], runner=None) -> torch.Tensor:
        """Run one step; returns the logits of every new token ``[num_tokens, vocab]`` (float32).

        ``runner`` (optional) is called instead of the model with the model's inputs, e.g. a graph runner.
        """
        from lmdeploy.pytorch.model_inputs import step_ctx_manager

        inputs = self.make_inputs(seqs, q_lens)
        ctx_mgr = self.model.ctx_mgr
        with step_ctx_manager(ctx_mgr):
            context = ctx_mgr.build_context(inputs=inputs, model_config=self.model_config,
                                            cache_config=self.cache_config, kv_caches=self.kv_caches,
                                            kv_quant_policy=self.cache_config.quant_policy)  # as the engine does
            with ctx_mgr.context(context):
                model_inputs = self.model.prepare_inputs_for_generation(past_key_values=self.kv_caches,
                                                                        context=context)
                output = (runner or self.model)(**model_inputs)
                hidden = output["hidden_states"] if isinstance(output, dict) else output
                logits = self.model.get_logits(hidden)
        self.last_context = context
        for seq, q in zip(seqs, q_lens):
            seq.cached += q
        return logits[0].float()


def hf_logits(model_path: str, token_lists: list[list[int]]) -> list[torch.Tensor]:
    """Transformers' float32 logits of every position of each token list (the oracle)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for tokens in token_lists:
            out.append(model(torch.tensor(tokens)[None]).logits[0].float())
    return out


def hf_logits_kv_quant(path: str, tokens: list[int], chunks: list[int], quant_bits: int) -> torch.Tensor:
    """transformers (float32) run chunk by chunk over a KV cache holding what a quantized cache holds: the first
    chunk attends to its own keys and values as they are (dlinfer's prefill without history), then every key
    (after rotary) and value in the cache is quantized and dequantized (``quantize.fake_quant_kv``) and each later
    chunk's new keys and values are too before attention reads them. Returns the logits of every chunk's tokens."""
    import sys

    import transformers

    from dlinfer.testing.quantize import fake_quant_kv

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    modeling = sys.modules[type(model).__module__]
    rotary = modeling.apply_rotary_pos_emb

    def rotary_then_quant(q, k, *args, **kwargs):
        q, k = rotary(q, k, *args, **kwargs)
        return q, fake_quant_kv(k, quant_bits)

    def quant_values(module, args, out):
        return fake_quant_kv(out.view(*out.shape[:-1], -1, model.config.head_dim), quant_bits).view(out.shape)

    cache = transformers.DynamicCache(config=model.config)
    logits, done, hooks = [], 0, []
    try:
        with torch.inference_mode():
            for i, n in enumerate(chunks):
                if i == 1:  # the first chunk's keys and values land quantized in the cache; later ones are too
                    for layer in cache.layers:
                        layer.keys = fake_quant_kv(layer.keys, quant_bits)
                        layer.values = fake_quant_kv(layer.values, quant_bits)
                    hooks = [m.v_proj.register_forward_hook(quant_values) for m in model.modules()
                             if hasattr(m, "v_proj")]
                    modeling.apply_rotary_pos_emb = rotary_then_quant
                out = model(torch.tensor(tokens[done:done + n])[None], past_key_values=cache, use_cache=True)
                logits.append(out.logits[0].float())
                done += n
    finally:
        modeling.apply_rotary_pos_emb = rotary
        for hook in hooks:
            hook.remove()
    return torch.cat(logits)
