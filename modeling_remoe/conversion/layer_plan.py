"""The ReMoE config and tensor plan of a conversion's result, and the option checks the conversions share.

`conversion_plan` lists the output tensors in checkpoint order: embeddings, final norm and LM head, then per layer the
attention and norms (the mean over the shared sources) and the FFN: for an MoE layer the router and the fused experts
(computed by an `ExpertTensors`), for a dense layer the source's FFN, copied.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..checkpoints import SafetensorsCheckpoint
from ..configuration_remoe import ReMoEConfig
from .architecture import Architecture, attention_shapes
from .writer import PlannedTensor

logger = logging.getLogger(__name__)

MIX_ROUTER_TYPES = ("relu", "topk")
# ReMoE fields that a conversion may set on top of the architecture (the controller and TopK loss settings).
CONTROLLER_FIELDS = ("l1_coef_init", "l1_coef_multiplier", "load_balance", "router_aux_loss_coef")
_DENSE_FFN = ("gate_proj", "up_proj", "down_proj")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_router_std(router_std: Any) -> None:
    """`router_std` (`--router_std`): None (the source's `initializer_range`) or a finite number > 0. A zero router
    switches every expert off under ReLU routing (and gives the router no gradient); a NaN one gives NaN gates."""
    if router_std is None:
        return
    number = isinstance(router_std, (int, float)) and not isinstance(router_std, bool)
    if not number or not math.isfinite(router_std) or router_std <= 0:
        raise ValueError(f"router_std (--router_std) must be a finite number > 0, got {router_std!r}")


def controller_fields(options: dict[str, Any]) -> dict[str, Any]:
    """The given `CONTROLLER_FIELDS` that are not None; `ValueError` for any other name."""
    unknown = sorted(set(options) - set(CONTROLLER_FIELDS))
    if unknown:
        raise ValueError(f"unknown ReMoE config fields {unknown}; a conversion may set {list(CONTROLLER_FIELDS)}")
    return {name: value for name, value in options.items() if value is not None}


def topk_routing_fields(
    router_type: str,
    router_renormalize: bool | None,
    router_sampling: bool | None,
    *,
    renormalize_default: bool = True,
    sampling_default: bool = False,
) -> dict[str, bool]:
    """`router_renormalize` and `router_sampling` of a TopK result (none for ReLU), None meaning the default.

    Renormalised top-k is BTX's router `SoftMax(TopK(Wx))`: the kept gates sum to 1, so experts that are copies of
    one FFN compute that FFN. `router_sampling` draws the k experts from the router softmax in training (BTX's
    "sample top-1"). `ValueError` naming the flag for a non-bool value, or for either set with ReLU routing.
    """
    given = {"router_renormalize": router_renormalize, "router_sampling": router_sampling}
    for name, value in given.items():
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} (--{name}) must be True or False, got {value!r}")
        if value and router_type != "topk":
            raise ValueError(f"{name} (--{name}) applies to router_type 'topk' only, got router_type={router_type!r}")
    if router_type != "topk":
        return {}
    return {
        "router_renormalize": renormalize_default if router_renormalize is None else router_renormalize,
        "router_sampling": sampling_default if router_sampling is None else router_sampling,
    }


def warn_constant_top1_gates(config: ReMoEConfig) -> None:
    """Warn when every gate is 1 (renormalised deterministic top-1): the router then learns from the balancing loss
    only."""
    top1 = config.router_type == "topk" and config.routed_top_k == 1
    if top1 and config.router_renormalize and not config.router_sampling:
        logger.warning(
            "renormalised top-1 routing without router_sampling: every gate is 1, so the router gets no gradient from "
            "the LM loss (only from the balancing loss); add --router_sampling (BTX's sample top-1) or "
            "--no_router_renormalize (Switch-style gates)"
        )


def remoe_config(arch: Architecture, source_config: dict[str, Any], **fields: Any) -> ReMoEConfig:
    """A ReMoE config with the source's attention/embedding architecture and the given MoE fields."""
    values = {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim,
        "hidden_act": arch.hidden_act,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_parameters": dict(arch.rope_parameters),
        "attention_bias": arch.attention_bias != "none",
        "tie_word_embeddings": arch.tie_word_embeddings,
        "initializer_range": source_config.get("initializer_range", 0.02),
        "bos_token_id": source_config.get("bos_token_id"),
        "eos_token_id": source_config.get("eos_token_id"),
        "pad_token_id": source_config.get("pad_token_id"),
    }
    values.update(fields)
    config = ReMoEConfig(**values)
    warn_constant_top1_gates(config)
    return config


@dataclasses.dataclass(frozen=True)
class ExpertTensors:
    """How a conversion computes the expert tensors of an MoE layer, each from the layer index."""

    router: Callable[[int], torch.Tensor]  # (routed experts, H)
    gate_up: Callable[[int], torch.Tensor]  # (routed experts, 2 * expert width, H)
    down: Callable[[int], torch.Tensor]  # (routed experts, H, expert width)


def fused_gate_up(ffns: Iterable[tuple[torch.Tensor, torch.Tensor]], chunk: int) -> torch.Tensor:
    """Experts of width `chunk` cut from (gate, up) projections of FFNs, stacked as fused (2 * chunk, H) weights."""
    return torch.stack(
        [torch.cat([g, u]) for gate, up in ffns for g, u in zip(gate.split(chunk), up.split(chunk), strict=True)]
    )


def stacked_down(downs: Iterable[torch.Tensor], chunk: int) -> torch.Tensor:
    """Experts of width `chunk` cut from down projections (H, F) of FFNs, stacked."""
    return torch.stack([piece for down in downs for piece in down.split(chunk, dim=1)])


def _mean_of(sources: Sequence[SafetensorsCheckpoint], name: str) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        if len(sources) == 1:
            return sources[0].get(name)
        total = sources[0].get(name).to(torch.float32)
        for source in sources[1:]:
            total += source.get(name).to(torch.float32)
        return total / len(sources)

    return make


def _shared_plan(
    arch: Architecture, sources: Sequence[SafetensorsCheckpoint], layer: int | None
) -> list[PlannedTensor]:
    """Attention, norms (one layer) or embeddings/final norm/LM head (layer None) as the mean over `sources`.

    A Qwen2-style source (no o_proj bias) gets a zero o_proj bias, since ReMoE's `attention_bias` covers q, k, v and o.
    """
    if layer is None:
        shapes = {"model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size)}
        shapes["model.norm.weight"] = (arch.hidden_size,)
        if not arch.tie_word_embeddings:
            shapes["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    else:
        shapes = attention_shapes(arch, layer)
    entries = [PlannedTensor(name, shape, _mean_of(sources, name)) for name, shape in shapes.items()]
    if layer is not None and arch.attention_bias == "qkv":
        name = f"model.layers.{layer}.self_attn.o_proj.bias"
        entries.append(PlannedTensor(name, (arch.hidden_size,), lambda: torch.zeros(arch.hidden_size)))
    return entries


def _ffn_plan(
    config: ReMoEConfig, layer: int, experts: ExpertTensors | None, source: SafetensorsCheckpoint
) -> list[PlannedTensor]:
    prefix = f"model.layers.{layer}.mlp."
    if not config.is_moe_layer(layer):
        names = [f"{prefix}{name}.weight" for name in _DENSE_FFN]
        return [PlannedTensor(name, source.shape(name), functools.partial(source.get, name)) for name in names]
    routed, width, hidden = config.num_routed_experts, config.expert_intermediate_size, config.hidden_size
    return [
        PlannedTensor(f"{prefix}router.weight", (routed, hidden), functools.partial(experts.router, layer)),
        PlannedTensor(
            f"{prefix}experts.gate_up_proj", (routed, 2 * width, hidden), functools.partial(experts.gate_up, layer)
        ),
        PlannedTensor(f"{prefix}experts.down_proj", (routed, hidden, width), functools.partial(experts.down, layer)),
    ]


def _controller_entry(config: ReMoEConfig) -> PlannedTensor:
    value = torch.tensor(config.l1_coef_init, dtype=torch.float32)
    return PlannedTensor("controller.l1_coef", (), lambda: value, dtype=torch.float32)


def conversion_plan(
    arch: Architecture,
    config: ReMoEConfig,
    shared_sources: Sequence[SafetensorsCheckpoint],
    experts: ExpertTensors | None = None,
) -> list[PlannedTensor]:
    """Every tensor of the result `config`, in checkpoint order.

    Attention, norms and embeddings are the mean over `shared_sources`; MoE layers come from `experts`, dense FFN
    layers (all of a dense result, or those of a ReMoE source with `moe_layer_freq` > 1) are copied from
    `shared_sources[0]`. An MoE result also gets the controller's L1 coefficient.
    """
    plan = _shared_plan(arch, shared_sources, None)
    for layer in range(arch.num_hidden_layers):
        plan += _shared_plan(arch, shared_sources, layer)
        plan += _ffn_plan(config, layer, experts, shared_sources[0])
    if config.router_type != "dense":
        plan.append(_controller_entry(config))
    return plan
