"""What a model is (from config.json and the safetensors headers) and how much GPU memory it
needs: weights plus KV cache for a context length and a number of concurrent sequences."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

DTYPE_BYTES = {
    "float32": 4, "F32": 4, "float16": 2, "F16": 2, "bfloat16": 2, "BF16": 2,
    "float8_e4m3fn": 1, "F8_E4M3": 1, "F8_E5M2": 1, "int8": 1, "I8": 1, "U8": 1,
    "I32": 4, "I64": 8, "F64": 8, "BOOL": 1, "I16": 2,
}  # fmt: skip
# Activations, CUDA graphs and the allocator's slack on top of weights and KV cache.
RUNTIME_OVERHEAD = 0.10
MAX_HEADER = 100 * 1024 * 1024


class ConfigError(ValueError):
    """config.json is missing, not JSON, or not a model configuration."""


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs keep the language model's numbers under ``text_config``."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def safetensors_parameters(path: Path) -> int:
    """Number of parameters in one safetensors file, read from its header only."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ConfigError(f"{path.name} is not a safetensors file (too short).")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise ConfigError(f"{path.name} is not a safetensors file (header of {length} bytes).")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise ConfigError(f"{path.name} has a malformed safetensors header: {exc}") from None
    total = 0
    for name, tensor in header.items():
        if name != "__metadata__":
            total += math.prod(tensor["shape"])
    return total


def read_model_facts(directory: Path) -> tuple[dict[str, Any], int | None]:
    """(config.json as a dict, parameter count from the safetensors headers or None)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError("The model has no config.json.")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError("config.json does not hold a JSON object.")
    weights = sorted(directory.rglob("*.safetensors"))
    parameters = sum(safetensors_parameters(p) for p in weights) if weights else None
    return config, parameters


def model_facts(config: dict[str, Any], parameters: int | None, size_bytes: int) -> dict[str, Any]:
    """The numbers the model page shows and the estimate needs."""
    text = _text_config(config)
    heads = text.get("num_attention_heads")
    hidden = text.get("hidden_size")
    head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
    architectures = config.get("architectures") or []
    dtype = text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype")
    return {
        "architecture": architectures[0] if architectures else config.get("model_type", ""),
        "model_type": config.get("model_type", ""),
        "parameters": parameters,
        "dtype": dtype,
        "context_length": text.get("max_position_embeddings"),
        "layers": text.get("num_hidden_layers"),
        "heads": heads,
        "kv_heads": text.get("num_key_value_heads") or heads,
        "hidden_size": hidden,
        "head_dim": head_dim,
        "vocab_size": text.get("vocab_size"),
        "weights_bytes": size_bytes,
    }


def estimate(
    facts: dict[str, Any], context_length: int, concurrency: int, kv_dtype_bytes: int | None = None
) -> dict[str, int]:
    """GPU memory in bytes for weights + KV cache of ``concurrency`` sequences of ``context_length``.

    KV cache per token = 2 (K and V) × layers × KV heads × head dim × bytes per value. Weights are
    the bytes of the weight files when known (they hold the real dtype), else parameters × dtype.
    """
    if context_length < 1 or concurrency < 1:
        raise ValueError("Context length and concurrency must be at least 1.")
    dtype_bytes = DTYPE_BYTES.get(str(facts.get("dtype") or ""), 2)
    kv_bytes = kv_dtype_bytes or dtype_bytes
    weights = facts.get("weights_bytes") or (facts.get("parameters") or 0) * dtype_bytes
    layers, kv_heads, head_dim = facts.get("layers"), facts.get("kv_heads"), facts.get("head_dim")
    if not (layers and kv_heads and head_dim):
        raise ValueError("config.json lacks the layer, head or hidden-size numbers needed for the KV cache.")
    kv_per_token = 2 * layers * kv_heads * head_dim * kv_bytes
    kv_cache = kv_per_token * context_length * concurrency
    overhead = int((weights + kv_cache) * RUNTIME_OVERHEAD)
    return {
        "weights_bytes": int(weights),
        "kv_cache_bytes": int(kv_cache),
        "kv_bytes_per_token": int(kv_per_token),
        "overhead_bytes": overhead,
        "total_bytes": int(weights + kv_cache + overhead),
    }
