"""What a source checkpoint is: its `Architecture` (parsed from the config) and the checks of its tensors.

Dense sources are Llama, Mistral, Qwen2 and dense ReMoE checkpoints, MoE sources Mixtral (original per-expert or fused
Transformers v5 tensors) and ReMoE. Every source is checked against its config (tensor names and shapes) before a
conversion plans anything.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from ..checkpoints import (
    CheckpointError,
    SafetensorsCheckpoint,
    check_config_keys,
    check_weights_match,
    expected_tensor_shapes,
)
from ..configuration_remoe import ReMoEConfig

logger = logging.getLogger(__name__)

DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "remoe")
MOE_MODEL_TYPES = ("mixtral", "remoe")
# MoE families whose layout ReMoE cannot represent exactly, with the reason.
# ReMoE router types a conversion can read (and write): the others' experts are not routed per token by a router
# matrix that another router could take over (see `read_architecture`).
CONVERTIBLE_ROUTER_TYPES = ("relu", "topk", "dense")
_UNCONVERTIBLE_ROUTERS = {
    "hash": "its routing is a fixed token-id hash table, with no router weights to carry over",
    "expert_choice": "its router was trained for batch-level expert choice, not per-token routing",
    "sparsemixer": "its router was trained with SparseMixer-v2's sampled top-k and gradient estimator",
    "lory": "its experts were trained to be merged softly per segment, not routed per token",
}
UNSUPPORTED_MOE_MODEL_TYPES = {
    "qwen3_moe": "its attention has per-head RMSNorm on queries and keys (q_norm/k_norm), which ReMoE does not have",
    "olmoe": "its attention has RMSNorm on queries and keys (q_norm/k_norm), which ReMoE does not have",
    "qwen2_moe": "it has a shared expert with a sigmoid gate next to the routed experts, which ReMoE does not have",
}


@contextmanager
def open_checkpoints(paths: Sequence[str | os.PathLike]) -> Iterator[list[SafetensorsCheckpoint]]:
    """The checkpoints at `paths`, all closed on exit."""
    with ExitStack() as stack:
        checkpoints = []
        for path in paths:
            checkpoint = SafetensorsCheckpoint(path)
            stack.callback(checkpoint.close)
            checkpoints.append(checkpoint)
        yield checkpoints


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The parts of a decoder that must agree between merged checkpoints and that the ReMoE config needs.

    `ffn_size` is the width of one layer's FFN for dense models and of one expert for MoE models.
    `attention_bias` is `"none"`, `"qkv"` (Qwen2: q, k, v have a bias, o has none) or `"all"`.
    `num_routed_experts` and `routed_top_k` count the experts of an MoE layer as routed, i.e. after a ReMoE source's
    granularity split (`E * G` and `k * G`, as `ReMoEConfig.num_routed_experts` / `routed_top_k`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_parameters: dict
    max_position_embeddings: int
    attention_bias: str
    tie_word_embeddings: bool
    num_routed_experts: int = 0  # 0: dense
    routed_top_k: int = 0
    moe_layout: str = ""  # MoE sources: "mixtral" (per-expert tensors), "mixtral_fused" (Transformers v5) or "remoe"

    def describe_difference(self, other: Architecture) -> list[str]:
        return [
            f"{field.name}={getattr(self, field.name)!r} vs {getattr(other, field.name)!r}"
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
        ]


def _common_fields(config, path: Path) -> dict[str, Any]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope:
        raise ValueError(f"{str(path)!r}: the config has no rope_parameters")
    return {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": float(config.rms_norm_eps),
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _warn_sliding_window(config, path: Path) -> None:
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True) and window is not None
    if uses_window and window < config.max_position_embeddings:
        logger.warning(
            "%s uses sliding-window attention (window %d); ReMoE attends to the full context, so outputs agree only "
            "for sequences of at most %d tokens",
            path,
            window,
            window,
        )


def read_architecture(checkpoint: SafetensorsCheckpoint) -> Architecture:
    """Parse a checkpoint's config (through `AutoConfig`, so legacy fields are normalised) into an `Architecture`."""
    path, model_type = checkpoint.path, checkpoint.model_type
    if model_type in UNSUPPORTED_MOE_MODEL_TYPES:
        raise ValueError(
            f"{str(path)!r}: model_type {model_type!r} cannot be converted to ReMoE: "
            f"{UNSUPPORTED_MOE_MODEL_TYPES[model_type]}"
        )
    if model_type not in (*DENSE_MODEL_TYPES, *MOE_MODEL_TYPES):
        raise ValueError(
            f"{str(path)!r}: model_type {model_type!r} is not supported; dense sources: {', '.join(DENSE_MODEL_TYPES)} "
            f"(ReMoE with router_type='dense'), MoE sources: {', '.join(MOE_MODEL_TYPES)}"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as error:
        raise CheckpointError(f"{path / 'config.json'}: {' '.join(str(error).split())}") from error
    fields = _common_fields(config, path)
    if model_type == "remoe":
        check_config_keys(checkpoint.config_dict, path / "config.json")
        if config.router_type not in CONVERTIBLE_ROUTER_TYPES:
            raise ValueError(
                f"{str(path)!r}: router_type {config.router_type!r} cannot be converted, upcycled or mixed "
                f"({_UNCONVERTIBLE_ROUTERS.get(config.router_type, 'not a ReLU or TopK router')}); conversions read "
                f"ReMoE checkpoints with router_type {', '.join(map(repr, CONVERTIBLE_ROUTER_TYPES))}. To keep "
                "training it, use `remoe train --model_name_or_path`"
            )
        bias = "all" if config.attention_bias else "none"
        if config.router_type == "dense":
            return Architecture(
                **fields, ffn_size=config.intermediate_size * config.num_experts_per_tok, attention_bias=bias
            )
        return Architecture(
            **fields,
            ffn_size=config.expert_intermediate_size,
            attention_bias=bias,
            num_routed_experts=config.num_routed_experts,
            routed_top_k=config.routed_top_k,
            moe_layout="remoe",
        )
    if model_type == "llama":
        if getattr(config, "mlp_bias", False):
            raise ValueError(f"{str(path)!r}: mlp_bias=True is not supported (ReMoE's FFNs have no bias)")
        return Architecture(
            **fields, ffn_size=config.intermediate_size, attention_bias="all" if config.attention_bias else "none"
        )
    _warn_sliding_window(config, path)
    if model_type == "mistral":
        return Architecture(**fields, ffn_size=config.intermediate_size, attention_bias="none")
    if model_type == "qwen2":
        return Architecture(**fields, ffn_size=config.intermediate_size, attention_bias="qkv")
    # mixtral: original per-expert tensors (`block_sparse_moe.experts.N.w1`) or the fused Transformers v5 layout
    layout = "mixtral" if "model.layers.0.block_sparse_moe.gate.weight" in checkpoint else "mixtral_fused"
    return Architecture(
        **fields,
        ffn_size=config.intermediate_size,
        attention_bias="none",
        num_routed_experts=config.num_local_experts,
        routed_top_k=config.num_experts_per_tok,
        moe_layout=layout,
    )


def attention_shapes(arch: Architecture, layer: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's attention and norm tensors as the source holds them."""
    prefix, hidden = f"model.layers.{layer}.", arch.hidden_size
    q_size, kv_size = arch.num_attention_heads * arch.head_dim, arch.num_key_value_heads * arch.head_dim
    shapes = {
        f"{prefix}self_attn.q_proj.weight": (q_size, hidden),
        f"{prefix}self_attn.k_proj.weight": (kv_size, hidden),
        f"{prefix}self_attn.v_proj.weight": (kv_size, hidden),
        f"{prefix}self_attn.o_proj.weight": (hidden, q_size),
        f"{prefix}input_layernorm.weight": (hidden,),
        f"{prefix}post_attention_layernorm.weight": (hidden,),
    }
    if arch.attention_bias in ("qkv", "all"):
        shapes[f"{prefix}self_attn.q_proj.bias"] = (q_size,)
        shapes[f"{prefix}self_attn.k_proj.bias"] = (kv_size,)
        shapes[f"{prefix}self_attn.v_proj.bias"] = (kv_size,)
    if arch.attention_bias == "all":
        shapes[f"{prefix}self_attn.o_proj.bias"] = (hidden,)
    return shapes


def _ffn_shapes(arch: Architecture, layer: int) -> dict[str, tuple[int, ...]]:
    prefix, hidden, ffn, experts = f"model.layers.{layer}.", arch.hidden_size, arch.ffn_size, arch.num_routed_experts
    if arch.moe_layout == "":
        return {
            f"{prefix}mlp.gate_proj.weight": (ffn, hidden),
            f"{prefix}mlp.up_proj.weight": (ffn, hidden),
            f"{prefix}mlp.down_proj.weight": (hidden, ffn),
        }
    if arch.moe_layout == "mixtral":
        moe = f"{prefix}block_sparse_moe."
        shapes = {f"{moe}gate.weight": (experts, hidden)}
        for expert in range(experts):
            shapes[f"{moe}experts.{expert}.w1.weight"] = (ffn, hidden)
            shapes[f"{moe}experts.{expert}.w2.weight"] = (hidden, ffn)
            shapes[f"{moe}experts.{expert}.w3.weight"] = (ffn, hidden)
        return shapes
    return {  # the fused Transformers v5 layout
        f"{prefix}mlp.gate.weight": (experts, hidden),
        f"{prefix}mlp.experts.gate_up_proj": (experts, 2 * ffn, hidden),
        f"{prefix}mlp.experts.down_proj": (experts, hidden, ffn),
    }


def expected_source_shapes(arch: Architecture) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(required tensor shapes, optional tensor names) of a checkpoint with this architecture."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size),
        "model.norm.weight": (arch.hidden_size,),
        "lm_head.weight": (arch.vocab_size, arch.hidden_size),
    }
    optional: set[str] = set()
    if arch.tie_word_embeddings:
        optional.add("lm_head.weight")
    for layer in range(arch.num_hidden_layers):
        shapes.update(attention_shapes(arch, layer))
        shapes.update(_ffn_shapes(arch, layer))
    return shapes, optional


def check_source_tensors(checkpoint: SafetensorsCheckpoint, arch: Architecture) -> None:
    """Raise `ValueError` unless the checkpoint holds exactly the tensors (names and shapes) its config implies."""
    if arch.model_type == "remoe":  # any ReMoE layout (dense, MoE, moe_layer_freq): the model itself says
        shapes, optional = expected_tensor_shapes(ReMoEConfig.from_pretrained(checkpoint.path))
    else:
        shapes, optional = expected_source_shapes(arch)
    where = f"{str(checkpoint.path)!r} ({arch.model_type})"
    unexpected = sorted(checkpoint.keys() - set(shapes))
    if unexpected and arch.model_type != "remoe":
        raise ValueError(
            f"{where} has {len(unexpected)} tensors that ReMoE cannot represent, e.g. {unexpected[:3]}; "
            "only Llama-style decoders convert"
        )
    check_weights_match(checkpoint, shapes, optional, where)


def check_dense(arch: Architecture, path: Path, what: str) -> None:
    """Raise `ValueError` if the source `what` at `path` is an MoE checkpoint."""
    if arch.moe_layout:
        raise ValueError(
            f"{what} {str(path)!r} is an MoE checkpoint ({arch.model_type}, {arch.num_routed_experts} experts); "
            "it takes dense checkpoints (use convert_moe / `remoe convert` for MoE checkpoints)"
        )
