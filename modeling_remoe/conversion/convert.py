"""A TopK MoE (Mixtral, or a ReMoE TopK/ReLU checkpoint) as a ReMoE checkpoint (`convert_moe`), and `convert`, which
takes any supported checkpoint (dense ones become a dense ReMoE)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import SafetensorsCheckpoint
from ..configuration_remoe import ReMoEConfig
from .architecture import Architecture, check_source_tensors, open_checkpoints, read_architecture
from .layer_plan import (
    MIX_ROUTER_TYPES,
    ExpertTensors,
    check_choice,
    controller_fields,
    conversion_plan,
    remoe_config,
    topk_routing_fields,
)
from .upcycle import to_dense_remoe
from .writer import OutputOptions


def _converted_config(
    arch: Architecture,
    checkpoint: SafetensorsCheckpoint,
    router_type: str,
    num_experts_per_tok: int | None,
    routing: dict[str, bool | None],
    controller: dict[str, Any],
) -> ReMoEConfig:
    """The result's config: the source's experts and k (unless `num_experts_per_tok`), routed by `router_type`.

    TopK routing keeps a ReMoE TopK source's `router_renormalize` and `router_sampling` unless `routing` sets them;
    from any other source it is renormalised (Mixtral's and BTX's convention) without sampling by default."""
    k = num_experts_per_tok if num_experts_per_tok is not None else arch.routed_top_k
    extra: dict[str, Any] = {}
    renormalize_default, sampling_default = True, False
    if arch.moe_layout == "remoe":
        source_config = ReMoEConfig.from_pretrained(checkpoint.path)
        num_experts, granularity = source_config.num_experts, source_config.granularity
        intermediate, freq = source_config.intermediate_size, source_config.moe_layer_freq
        if num_experts_per_tok is None:
            k = source_config.num_experts_per_tok
        dense_width = intermediate * k
        # Routing settings of the source carry over when its router type is kept.
        if router_type == "topk":
            extra["router_aux_loss_coef"] = source_config.router_aux_loss_coef
        if router_type == source_config.router_type == "topk":
            renormalize_default, sampling_default = source_config.router_renormalize, source_config.router_sampling
        if router_type == source_config.router_type == "relu":
            for name in ("l1_coef_init", "l1_coef_multiplier", "load_balance"):
                extra[name] = getattr(source_config, name)
    else:  # Mixtral: no granularity split, so its routed experts are its experts
        num_experts, granularity, intermediate, freq = arch.num_routed_experts, 1, arch.ffn_size, 1
        dense_width = None
        if router_type == "topk":
            extra["router_aux_loss_coef"] = checkpoint.config_dict.get("router_aux_loss_coef", 0.01)
    extra.update(
        topk_routing_fields(
            router_type, **routing, renormalize_default=renormalize_default, sampling_default=sampling_default
        )
    )
    config = remoe_config(
        arch,
        checkpoint.config_dict,
        intermediate_size=intermediate,
        num_experts=num_experts,
        num_experts_per_tok=k,
        granularity=granularity,
        router_type=router_type,
        moe_layer_freq=freq,
        **{**extra, **controller},
    )
    if freq > 1 and dense_width is not None and dense_width != intermediate * config.num_experts_per_tok:
        raise ValueError(
            f"num_experts_per_tok={k} would change the width of the dense layers of this ReMoE checkpoint "
            f"(moe_layer_freq={freq}); keep the source's k"
        )
    return config


def _source_experts(
    arch: Architecture, checkpoint: SafetensorsCheckpoint, config: ReMoEConfig, router_type: str
) -> ExpertTensors:
    """The source's expert tensors in ReMoE's fused layout; softmax router rows centred for ReLU routing."""
    source_is_relu = checkpoint.config_dict.get("router_type") == "relu"

    def router_rows(name: str) -> torch.Tensor:
        weight = checkpoint.get(name)
        if router_type == "relu" and not source_is_relu:
            weight = weight.to(torch.float32)
            return weight - weight.mean(dim=0, keepdim=True)
        return weight

    if arch.moe_layout == "mixtral":
        experts = range(config.num_routed_experts)

        def moe(layer: int) -> str:
            return f"model.layers.{layer}.block_sparse_moe."

        def gate_up(layer: int) -> torch.Tensor:
            return torch.stack(
                [torch.cat([checkpoint.get(f"{moe(layer)}experts.{e}.w{i}.weight") for i in (1, 3)]) for e in experts]
            )

        return ExpertTensors(
            router=lambda layer: router_rows(f"{moe(layer)}gate.weight"),
            gate_up=gate_up,
            down=lambda layer: torch.stack([checkpoint.get(f"{moe(layer)}experts.{e}.w2.weight") for e in experts]),
        )
    router = "router" if arch.moe_layout == "remoe" else "gate"
    return ExpertTensors(  # the fused layouts of ReMoE and Transformers v5 Mixtral
        router=lambda layer: router_rows(f"model.layers.{layer}.mlp.{router}.weight"),
        gate_up=lambda layer: checkpoint.get(f"model.layers.{layer}.mlp.experts.gate_up_proj"),
        down=lambda layer: checkpoint.get(f"model.layers.{layer}.mlp.experts.down_proj"),
    )


def convert_moe(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    router_type: str = "relu",
    num_experts_per_tok: int | None = None,
    router_renormalize: bool | None = None,
    router_sampling: bool | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    **controller: Any,
) -> Path:
    """A Mixtral (original or fused tensor layout) or ReMoE MoE checkpoint as a ReMoE checkpoint.

    Experts, attention, norms and embeddings are kept. `router_type="topk"` keeps the source's behaviour (the router
    weights are copied; `router_renormalize` is set, as Mixtral renormalises its top-k weights, and a ReMoE TopK
    source keeps its own `router_renormalize` and `router_sampling`; either can be set explicitly).
    `router_type="relu"` switches ReLU routing and the L1 controller on for a short finetune: the router weights are
    reused minus their mean over the experts (the component a softmax ignores), so `ReLU(x W^T)` starts where the
    softmax router preferred an expert. `num_experts_per_tok` defaults to the source's k (ReMoE's target `1 - k/E`).
    """
    source_path = Path(source)
    output = OutputOptions(Path(output_dir), dtype, max_shard_size, overwrite)
    check_choice("router_type", router_type, MIX_ROUTER_TYPES)
    routing = {"router_renormalize": router_renormalize, "router_sampling": router_sampling}
    topk_routing_fields(router_type, **routing)
    controller = controller_fields(controller)
    output.check([source_path])
    with open_checkpoints([source_path]) as (checkpoint,):
        arch = read_architecture(checkpoint)
        if not arch.moe_layout:
            raise ValueError(
                f"convert_moe takes an MoE checkpoint; {str(source_path)!r} is dense ({arch.model_type}): "
                "use to_dense_remoe, upcycle or btx_mix"
            )
        check_source_tensors(checkpoint, arch)
        config = _converted_config(arch, checkpoint, router_type, num_experts_per_tok, routing, controller)
        plan = conversion_plan(arch, config, [checkpoint], _source_experts(arch, checkpoint, config, router_type))
        info = {
            "method": "convert_moe",
            "source": str(source_path),
            "source_model_type": arch.model_type,
            "router_type": router_type,
        }
        return output.write(plan, config, [checkpoint], info, "convert")


def convert(
    source: str | os.PathLike, output_dir: str | os.PathLike, *, router_type: str | None = None, **kwargs: Any
) -> Path:
    """`remoe convert`: a dense Llama / Mistral / Qwen2 checkpoint becomes a dense ReMoE (`router_type` None or
    `"dense"`), an MoE checkpoint (Mixtral, ReMoE) a ReMoE with `router_type` (default `"relu"`)."""
    if router_type not in (None, "dense", *MIX_ROUTER_TYPES):
        raise ValueError(
            f"router_type (--router_type) {router_type!r}: convert writes ReLU- or TopK-routed ReMoE models "
            f"({', '.join(MIX_ROUTER_TYPES)}) or dense ones; a {router_type} model is trained from scratch "
            f"(`remoe train --router_type {router_type}`)"
        )
    with open_checkpoints([source]) as (checkpoint,):
        arch = read_architecture(checkpoint)
    if not arch.moe_layout:
        if router_type not in (None, "dense"):
            raise ValueError(
                f"{str(source)!r} is dense: convert writes a dense ReMoE (router_type 'dense'); "
                f"to build an MoE from it use `remoe upcycle`, got router_type={router_type!r}"
            )
        allowed = {"dtype", "max_shard_size", "overwrite"}
        ignored = sorted(name for name, value in kwargs.items() if name not in allowed and value is not None)
        if ignored:
            raise ValueError(f"{ignored} apply to MoE sources only; {str(source)!r} is dense")
        return to_dense_remoe(source, output_dir, **{k: v for k, v in kwargs.items() if k in allowed})
    return convert_moe(source, output_dir, router_type=router_type or "relu", **kwargs)
