"""One dense checkpoint as a ReMoE checkpoint: sparse upcycling into an MoE (`upcycle`), or the same function as a
dense ReMoE (`to_dense_remoe`)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import SafetensorsCheckpoint
from ..configuration_remoe import ReMoEConfig
from .architecture import Architecture, check_dense, check_source_tensors, open_checkpoints, read_architecture
from .layer_plan import (
    MIX_ROUTER_TYPES,
    ExpertTensors,
    check_choice,
    check_positive_int,
    check_router_std,
    controller_fields,
    conversion_plan,
    fused_gate_up,
    remoe_config,
    stacked_down,
    topk_routing_fields,
)
from .routers import random_router
from .writer import OutputOptions

UPCYCLE_MODES = ("copy", "split")


def _dense_architecture(checkpoint: SafetensorsCheckpoint, what: str) -> Architecture:
    """The architecture of a dense source, its tensors checked."""
    arch = read_architecture(checkpoint)
    check_dense(arch, checkpoint.path, what)
    check_source_tensors(checkpoint, arch)
    return arch


def _noisy_copies(weight: torch.Tensor, copies: int, noise: float, seed: int, layer: int, which: int) -> torch.Tensor:
    """`copies` copies of `weight` (stacked on a new dim 0) with independent relative noise."""
    stacked = weight.unsqueeze(0).expand(copies, *weight.shape).to(torch.float32)
    if noise == 0:
        return stacked
    generator = torch.Generator().manual_seed((seed * 100_003 + layer) * 3 + which)
    scale = noise * weight.to(torch.float32).std()
    return stacked + torch.randn(stacked.shape, generator=generator) * scale


def upcycle(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    num_experts: int,
    granularity: int = 1,
    mode: str = "copy",
    router_type: str = "relu",
    num_experts_per_tok: int = 1,
    router_renormalize: bool | None = None,
    router_sampling: bool | None = None,
    noise: float = 0.0,
    router_std: float | None = None,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    **controller: Any,
) -> Path:
    """Sparse upcycling: one dense checkpoint becomes a ReMoE MoE with `num_experts` experts per layer.

    `mode="copy"`: every expert is a copy of the FFN (width `ffn`), each cut into `granularity` chunks, plus Gaussian
    noise of `noise` times each weight's standard deviation. With gates summing to 1 over the copies the MoE computes
    the dense FFN: with TopK routing renormalised over the kept experts (`router_renormalize`, the default for
    `router_type="topk"`), `noise=0` and `granularity=1` the result equals the source at initialisation;
    `router_renormalize=False` keeps the softmax values (gates summing to less than 1). `router_sampling` (TopK) draws
    the experts from the router softmax in training. `mode="split"`: the FFN is cut into `num_experts * granularity`
    chunks, one per routed expert (`intermediate_size = ffn / num_experts`); with every gate at 1 the MoE computes the
    dense FFN. The router is random (normal, std `router_std`, default the source's `initializer_range`); attention,
    norms and embeddings are copied.
    """
    source_path = Path(source)
    output = OutputOptions(Path(output_dir), dtype, max_shard_size, overwrite)
    check_choice("mode", mode, UPCYCLE_MODES)
    check_choice("router_type", router_type, MIX_ROUTER_TYPES)
    routing = topk_routing_fields(router_type, router_renormalize, router_sampling)
    check_positive_int("num_experts", num_experts)
    check_positive_int("granularity", granularity)
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise (--noise) must be a finite number >= 0, got {noise!r}")
    check_router_std(router_std)
    controller = controller_fields(controller)
    output.check([source_path])

    with open_checkpoints([source_path]) as (checkpoint,):
        arch = _dense_architecture(checkpoint, "upcycle source")
        pieces = num_experts * granularity if mode == "split" else granularity
        if arch.ffn_size % pieces:
            raise ValueError(f"{mode} into {pieces} chunks needs them to divide the FFN width {arch.ffn_size}")
        config = remoe_config(
            arch,
            checkpoint.config_dict,
            intermediate_size=arch.ffn_size // num_experts if mode == "split" else arch.ffn_size,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            granularity=granularity,
            router_type=router_type,
            moe_layer_freq=1,
            **routing,
            **controller,
        )
        std = router_std if router_std is not None else config.initializer_range
        chunk, copies = config.expert_intermediate_size, num_experts if mode == "copy" else 1

        def copied(name: str, layer: int, which: int) -> torch.Tensor:
            weight = checkpoint.get(f"model.layers.{layer}.mlp.{name}.weight")
            return _noisy_copies(weight, copies, noise, seed, layer, which)  # (copies, *weight.shape)

        experts = ExpertTensors(
            router=lambda layer: random_router(config.num_routed_experts, arch.hidden_size, std, seed, layer),
            gate_up=lambda layer: fused_gate_up(
                zip(copied("gate_proj", layer, 0), copied("up_proj", layer, 1), strict=True), chunk
            ),
            down=lambda layer: stacked_down(copied("down_proj", layer, 2), chunk),
        )
        plan = conversion_plan(arch, config, [checkpoint], experts)
        info = {"method": "upcycle", "source": str(source_path), "mode": mode, "noise": noise, "seed": seed}
        size_flags = f"num_experts (--num_experts) {num_experts}"
        if granularity > 1:
            size_flags += f", granularity (--granularity) {granularity}"
        return output.write(plan, config, [checkpoint], info, "upcycle", size_flags)


def dense_remoe_config(checkpoint: SafetensorsCheckpoint, arch: Architecture | None = None) -> ReMoEConfig:
    """The config of the dense ReMoE checkpoint that `to_dense_remoe` writes for the dense source `checkpoint`
    (`arch`: its architecture, read when not given). Nothing is written."""
    arch = arch if arch is not None else read_architecture(checkpoint)
    return remoe_config(
        arch,
        checkpoint.config_dict,
        intermediate_size=arch.ffn_size,
        num_experts=1,
        num_experts_per_tok=1,
        router_type="dense",
    )


def to_dense_remoe(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """A Llama / Mistral / Qwen2 checkpoint as a dense ReMoE checkpoint computing the same function
    (`router_type="dense"`, `num_experts=num_experts_per_tok=1`, `intermediate_size` = the FFN width), so that
    `remoe train --model_name_or_path` can continue it."""
    source_path = Path(source)
    output = OutputOptions(Path(output_dir), dtype, max_shard_size, overwrite)
    output.check([source_path])
    with open_checkpoints([source_path]) as (checkpoint,):
        arch = _dense_architecture(checkpoint, "to_dense_remoe source")
        config = dense_remoe_config(checkpoint, arch)
        plan = conversion_plan(arch, config, [checkpoint])
        info = {"method": "to_dense_remoe", "source": str(source_path), "source_model_type": arch.model_type}
        return output.write(plan, config, [checkpoint], info, "to dense ReMoE")
