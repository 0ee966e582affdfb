"""Tiny random-weight models and an offline tokenizer, built locally (no model hub).

``build_tiny_model(path, arch)`` writes a Hugging Face model directory that transformers, vLLM and LMDeploy
load with ``HF_HUB_OFFLINE=1``: ``config.json``, ``model.safetensors`` with seeded random weights,
``generation_config.json`` and a byte-level BPE tokenizer trained in memory (``tokenizer.json``,
``tokenizer_config.json`` with a chat template).

The same call with the same arguments writes the same weights and tokenizer, so tests are repeatable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")

# Real shapes for GPU throughput runs (random weights; fewer layers allowed via num_hidden_layers=...).
REAL_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                max_position_embeddings=8192, rope_theta=500000.0)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        vocab_size=151936, max_position_embeddings=8192, rope_theta=1000000.0)),
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                                     max_position_embeddings=8192, rope_theta=1000000.0)),
}

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. A paged key value cache stores the keys and values of every
sequence in fixed size blocks, and a block table maps each sequence to its blocks. Attention reads the cache
through that table. Large language models generate one token at a time: the prefill step processes the
prompt, and each decode step attends to everything before it. Mixture of experts layers send each token to a
few experts chosen by a router. Rotary position embeddings rotate pairs of features by an angle that grows
with the position. Root mean square normalization divides by the norm of the hidden state. Hello world!
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Python, Triton, CUDA, PyTorch, vLLM and LMDeploy serve models.
"""


def _base_config(arch: str) -> dict[str, Any]:
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.08, hidden_act="silu",
                  attention_bias=False)
    if arch == "qwen2":
        common.update(attention_bias=True)
        common.pop("head_dim")  # Qwen2 derives it from hidden_size / heads (= 32)
    if arch == "qwen3_moe":
        common.update(moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[])
    if arch == "mixtral":
        common.update(num_local_experts=8, num_experts_per_tok=2)
    return common


def _config_class(arch: str):
    import transformers

    return {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "mixtral": transformers.MixtralConfig,
    }[arch]


def build_tokenizer(path: str | os.PathLike, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer in memory and save it to ``path``; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def build_tiny_model(path: str | os.PathLike, arch: str = "llama", *, dtype: torch.dtype = torch.float32,
                     seed: int = 0, device: str | torch.device = "cpu", **config_overrides: Any) -> str:
    """Write a random-weight ``arch`` model with an offline tokenizer to ``path`` and return the path.

    Args:
        path: output directory (created).
        arch: one of ``llama``, ``qwen2``, ``qwen3``, ``qwen3_moe``, ``mixtral``; or a key of ``REAL_SHAPES``
            (``llama3-8b``, ``qwen3-30b-a3b``, ``mixtral-8x7b``) for a real-shaped model.
        dtype: weight dtype written to the checkpoint (and ``torch_dtype`` in the config).
        seed: weights are a function of the seed.
        device: where the weights are initialised (use ``cuda`` for real shapes: seconds instead of minutes).
        config_overrides: any config field, e.g. ``num_hidden_layers=4``.
    """
    import transformers

    if arch in REAL_SHAPES:
        arch, shape = REAL_SHAPES[arch]
        # transformers' default init (0.02): with the tiny models' 0.08 at real widths, attention scores have a
        # std of ~25, attention is near-argmax and greedy tokens flip on rounding-level differences.
        fields = dict(_base_config(arch), initializer_range=0.02, **shape)
    elif arch in ARCHS:
        fields = _base_config(arch)
    else:
        raise ValueError(f"arch must be one of {ARCHS + tuple(REAL_SHAPES)}, got {arch!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    fields.setdefault("vocab_size", max(len(tokenizer), 512))
    fields.update(config_overrides)
    fields.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size must be >= the tokenizer's {len(tokenizer)} tokens")
    config = _config_class(arch)(**fields)
    config.dtype = dtype
    model_cls = transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls.from_config(config, dtype=dtype)
    _randomize(model, seed, config.initializer_range)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(str(path), safe_serialization=True)
    del model
    with open(path / "dlinfer_tiny_model.json", "w") as f:
        json.dump({"arch": arch, "seed": seed, "dtype": str(dtype).replace("torch.", "")}, f)
    return str(path)


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    """Seeded normal weights (norm weights near 1), independent of transformers' own init order."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        gen = gens.setdefault(param.device, torch.Generator(device=param.device).manual_seed(seed))
        noise = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
        if "norm" in name and param.dim() == 1:
            values = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            values = 0.02 * noise
        else:
            values = std * noise
        param.copy_(values.to(param.dtype))


def _value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, booleans, lists), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    """``python -m dlinfer.testing.tiny_models PATH [--arch A] [--dtype D] [--seed N] [--set field=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dlinfer.testing.tiny_models",
        description="Write a random-weight model with an offline tokenizer to PATH (a Hugging Face model "
                    "directory that transformers, vLLM and LMDeploy load offline). Same arguments, same files.")
    parser.add_argument("path", help="output directory (created)")
    parser.add_argument("--arch", default="llama", choices=ARCHS + tuple(REAL_SHAPES),
                        help="architecture, or a real-shaped model (default: llama)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="weight dtype (default: float32)")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of the seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="where weights are initialised (cuda for real shapes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field, e.g. --set num_hidden_layers=4 (repeatable; values parsed as JSON)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        field, sep, text = item.partition("=")
        if not sep or not field.strip():
            parser.error(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[field.strip()] = _value(text)
    try:
        path = build_tiny_model(args.path, args.arch, dtype=getattr(torch, args.dtype), seed=args.seed,
                                device=args.device, **overrides)
    except (ValueError, TypeError) as exc:  # a bad config field or value: one line, exit 2
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
