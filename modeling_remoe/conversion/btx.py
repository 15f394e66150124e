"""Branch-Train-MiX: dense checkpoints (one per domain, branched from one seed) merged into one ReMoE MoE.

The FFN of every layer of source i becomes expert i (optionally cut into `split` finer experts), attention, norms,
embeddings and LM head are averaged (or taken from a base), and a new ReLU or TopK router is initialised
(`routers.py`). `blend` is the BTX paper's "blending experts" ablation: every FFN is cut into one chunk per source and
expert j is made of chunk j of every source, so no expert belongs to one domain. TopK routing is BTX's `SoftMax(TopK(Wx))` by default (`router_renormalize`): the kept gates sum to 1,
so a mix of identical sources computes the source.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import SafetensorsCheckpoint
from ..configuration_remoe import ReMoEConfig
from .architecture import (
    Architecture,
    check_dense,
    check_source_tensors,
    open_checkpoints,
    read_architecture,
)
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
from .routers import ROUTER_INITS, centroid_routers, random_router
from .writer import OutputOptions, meta_model

SHARED_MODES = ("average", "base")


@dataclasses.dataclass(frozen=True)
class MixOptions:
    """How `btx_mix` builds the MoE: every keyword of `btx_mix` but those of the output.

    Attributes:
        seed_model: the seed the sources were branched from; with `seed_as_expert` it becomes a generalist expert
            (the last one). It is also the base for `shared="base"` and the model that `router_init="centroid"` runs.
        router_type: `"relu"` (ReMoE, sparsity target `1 - k/E`) or `"topk"`.
        num_experts_per_tok: k (TopK's experts per token, ReMoE's target).
        router_renormalize: TopK: the k kept softmax values renormalised to sum 1 (None: True, BTX's router);
            False keeps them as they are (the ReMoE paper's TopK baseline).
        router_sampling: TopK: in training, sample the k experts from the router softmax (BTX's "sample top-1";
            None: False).
        shared: `"average"`: attention, norms, embeddings and LM head are the mean of the expert sources;
            `"base"`: copied from `seed_model` (or the first source).
        router_init: `"random"` (normal, std `router_std`, default the source's `initializer_range`) or `"centroid"`:
            from the mean hidden state of each domain's `router_texts` (one list of texts per source, or a function
            returning them, called once every check has passed), see `centroid_router`; at most `router_max_tokens`
            tokens of each list are used.
        split: cut every FFN into `split` experts of width `ffn/split` (the granularity of the result).
        blend: the "blending experts" ablation: with N expert sources, each FFN is cut into N chunks of width `ffn/N`
            and expert j concatenates chunk j of every source (then `split` applies to these experts). All experts
            together still hold every source's FFN; the router cannot start from domain centroids.
        expert_names: one name per source (default: folder names), written to `remoe_conversion.json`.
        controller: `l1_coef_init`, `l1_coef_multiplier`, `load_balance`, `router_aux_loss_coef` of the result.
    """

    seed_model: str | os.PathLike | None = None
    seed_as_expert: bool = False
    router_type: str = "relu"
    num_experts_per_tok: int = 2
    router_renormalize: bool | None = None
    router_sampling: bool | None = None
    shared: str = "average"
    router_init: str = "random"
    router_texts: Sequence[Sequence[str]] | Callable[[], Sequence[Sequence[str]]] | None = None
    router_max_tokens: int = 4096
    split: int = 1
    blend: bool = False
    expert_names: Sequence[str] | None = None
    router_std: float | None = None
    seed: int = 0
    controller: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_keywords(cls, keywords: dict[str, Any]) -> MixOptions:
        """The options among `keywords`; every other keyword is a controller field."""
        names = {field.name for field in dataclasses.fields(cls)} - {"controller"}
        controller = {name: value for name, value in keywords.items() if name not in names}
        return cls(**{name: value for name, value in keywords.items() if name in names}, controller=controller)

    @property
    def seed_path(self) -> Path | None:
        return Path(self.seed_model) if self.seed_model is not None else None

    def checked(self, num_sources: int) -> MixOptions:
        """These options with the controller fields checked; `ValueError` for a bad option."""
        if num_sources < 1 or num_sources + int(self.seed_as_expert) < 2:
            raise ValueError("btx mix needs at least 2 experts (sources, plus the seed with seed_as_expert)")
        if self.seed_as_expert and self.seed_model is None:
            raise ValueError("seed_as_expert needs seed_model")
        check_choice("router_type", self.router_type, MIX_ROUTER_TYPES)
        topk_routing_fields(self.router_type, self.router_renormalize, self.router_sampling)
        check_choice("shared", self.shared, SHARED_MODES)
        check_choice("router_init", self.router_init, ROUTER_INITS)
        if self.router_init == "centroid":
            if not callable(self.router_texts):
                _check_router_texts(self.router_texts, num_sources)
            if self.router_std is not None:
                raise ValueError(
                    "router_std (--router_std) is the std of the random router; router_init='centroid' computes the "
                    "router from the texts: leave router_std out"
                )
        elif self.router_texts is not None:
            raise ValueError(
                "router_texts (--router_texts) initialise the router with router_init='centroid' (--router_init "
                f"centroid); router_init={self.router_init!r} does not use them"
            )
        check_router_std(self.router_std)
        if self.expert_names is not None:
            names = list(self.expert_names)
            if len(names) != num_sources:
                raise ValueError(
                    f"expert_names (--expert_names) needs one name per source ({num_sources}), got {len(names)}"
                )
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates or not all(isinstance(name, str) and name for name in names):
                raise ValueError(
                    f"expert_names (--expert_names) must be unique non-empty names, got {names}"
                    + (f" ({duplicates} repeated)" if duplicates else "")
                )
        check_positive_int("split", self.split)
        if not isinstance(self.blend, bool):
            raise ValueError(f"blend (--blend) must be True or False, got {self.blend!r}")
        if self.blend and self.router_init == "centroid":
            raise ValueError(
                "blend (--blend) mixes every domain into every expert, so router_init='centroid' (one domain centroid "
                "per expert) does not apply; use router_init='random'"
            )
        return dataclasses.replace(self, controller=controller_fields(self.controller))


def _check_router_texts(texts: Any, num_sources: int) -> None:
    """router_init='centroid' needs one list of texts per source."""
    if texts is None or len(texts) != num_sources:
        raise ValueError(
            f"router_init='centroid' needs router_texts: one list of texts per source ({num_sources}), "
            f"got {0 if texts is None else len(texts)}"
        )


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def _check_same_architecture(archs: list[Architecture], paths: list[Path]) -> None:
    """Raise `ValueError` naming the differences unless all sources share the first one's architecture."""
    for arch, path in zip(archs[1:], paths[1:], strict=True):
        differences = archs[0].describe_difference(arch)
        if differences:
            raise ValueError(
                f"sources must share one architecture; {str(paths[0])!r} and {str(path)!r} differ: "
                f"{'; '.join(differences)}. (A Llama/Mistral/Qwen2 seed is first converted to a dense ReMoE "
                "checkpoint by `remoe convert` / `remoe btx branch`: mix the converted seed.)"
            )


def _checked_architecture(
    checkpoints: list[SafetensorsCheckpoint], paths: list[Path], seed_path: Path | None, split: int, blend_parts: int
) -> Architecture:
    """The one dense architecture of all sources (and the seed), their tensors checked."""
    archs = [read_architecture(checkpoint) for checkpoint in checkpoints]
    for arch, path in zip(archs, paths, strict=True):
        check_dense(arch, path, "btx mix source" if path != seed_path else "seed_model")
    _check_same_architecture(archs, paths)
    for checkpoint, arch in zip(checkpoints, archs, strict=True):
        check_source_tensors(checkpoint, arch)
    if archs[0].ffn_size % split:
        raise ValueError(f"split={split} must divide the FFN width {archs[0].ffn_size}")
    if archs[0].ffn_size % blend_parts:
        raise ValueError(
            f"blend needs the number of experts ({blend_parts}) to divide the FFN width {archs[0].ffn_size}"
        )
    return archs[0]


def _router(mix: MixOptions, config: ReMoEConfig, reference: Path, num_sources: int) -> Callable[[int], torch.Tensor]:
    """A layer's router rows: centroid rows (computed here, from the model at `reference`) or random ones."""
    if mix.router_init == "centroid":
        texts = mix.router_texts() if callable(mix.router_texts) else mix.router_texts
        _check_router_texts(texts, num_sources)
        rows = centroid_routers(
            reference, texts, generalist=mix.seed_as_expert, max_tokens=mix.router_max_tokens
        )  # (L, experts, H)
        return lambda layer: rows[layer].repeat_interleave(mix.split, dim=0)
    std = mix.router_std if mix.router_std is not None else config.initializer_range
    return lambda layer: random_router(config.num_routed_experts, config.hidden_size, std, mix.seed, layer)


def blended(weights: Sequence[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """Blending experts: each of the N weights cut into N chunks along the FFN dimension `dim`; blend j is the
    concatenation of chunk j of every weight (in source order)."""
    chunks = [weight.chunk(len(weights), dim=dim) for weight in weights]
    return [torch.cat([pieces[j] for pieces in chunks], dim=dim) for j in range(len(weights))]


def _experts(
    sources: list[SafetensorsCheckpoint], chunk: int, router: Callable[[int], torch.Tensor], blend: bool
) -> ExpertTensors:
    """Each source's FFN (or with `blend`, each blend of all sources' FFNs) cut into experts of width `chunk`."""

    def get(name: str, layer: int) -> list[torch.Tensor]:
        weights = [source.get(f"model.layers.{layer}.mlp.{name}.weight") for source in sources]
        return blended(weights, dim=1 if name == "down_proj" else 0) if blend else weights

    def gate_up(layer: int) -> torch.Tensor:
        return fused_gate_up(zip(get("gate_proj", layer), get("up_proj", layer), strict=True), chunk)

    return ExpertTensors(router, gate_up, lambda layer: stacked_down(get("down_proj", layer), chunk))


def btx_mix(
    sources: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Merge dense checkpoints (one per domain) into a ReMoE MoE checkpoint (Branch-Train-MiX).

    Args:
        sources: dense checkpoint folders (Llama, Mistral, Qwen2 or dense ReMoE, one architecture); the FFN of each
            layer of source i becomes expert i.
        output_dir: where the ReMoE checkpoint is written (must not exist or be empty unless `overwrite`).
        dtype: dtype of the result (default: the first source's).
        options: the fields of `MixOptions` (`seed_model`, `seed_as_expert`, `router_type`, `num_experts_per_tok`,
            `router_renormalize`, `router_sampling`, `shared`, `router_init`, `router_texts`, `router_max_tokens`, `split`,
            `blend`, `expert_names`, `router_std`,
            `seed`) and the controller fields `l1_coef_init`, `l1_coef_multiplier`, `load_balance`,
            `router_aux_loss_coef` of the result.

    Returns the output folder. Raises `ValueError` (before writing) for bad options or mismatched sources.
    """
    source_paths = [Path(p) for p in sources]
    mix = MixOptions.from_keywords(options).checked(len(source_paths))
    output = OutputOptions(Path(output_dir), dtype, max_shard_size, overwrite)
    seed_path = mix.seed_path
    all_paths = source_paths + ([seed_path] if seed_path is not None else [])
    output.check(all_paths)

    with open_checkpoints(all_paths) as checkpoints:
        num_experts = len(source_paths) + int(mix.seed_as_expert)
        arch = _checked_architecture(checkpoints, all_paths, seed_path, mix.split, num_experts if mix.blend else 1)
        expert_sources = checkpoints[: len(source_paths)]
        seed_checkpoint = checkpoints[-1] if seed_path is not None else None
        if mix.seed_as_expert:
            expert_sources = [*expert_sources, seed_checkpoint]
        names = list(mix.expert_names or [p.name for p in source_paths]) + (["seed"] if mix.seed_as_expert else [])
        config = remoe_config(
            arch,
            checkpoints[0].config_dict,
            intermediate_size=arch.ffn_size,
            num_experts=len(expert_sources),
            num_experts_per_tok=mix.num_experts_per_tok,
            granularity=mix.split,
            router_type=mix.router_type,
            moe_layer_freq=1,
            **topk_routing_fields(mix.router_type, mix.router_renormalize, mix.router_sampling),
            **mix.controller,
        )
        # A bad dtype, or a result too large for this machine, fails before the centroid init runs a model.
        size_flags = f"{len(expert_sources)} experts" + (f", split (--split) {mix.split}" if mix.split > 1 else "")
        output.check_size(meta_model(config), output.dtype_for(checkpoints[0]), "btx mix", size_flags)
        shared_sources = expert_sources if mix.shared == "average" else [seed_checkpoint or checkpoints[0]]
        router = _router(mix, config, seed_path or source_paths[0], len(source_paths))
        plan = conversion_plan(
            arch, config, shared_sources, _experts(expert_sources, config.expert_intermediate_size, router, mix.blend)
        )
        split = mix.split
        experts = [
            {"name": name, "source": str(source.path), "routed_experts": list(range(i * split, (i + 1) * split))}
            for i, (name, source) in enumerate(zip(_unique_names(names), expert_sources, strict=True))
        ]
        if mix.blend:  # expert j holds chunk j of every source
            experts = [{**expert, "name": f"blend-{i}", "source": "all sources"} for i, expert in enumerate(experts)]
        info = {
            "method": "btx_mix",
            "sources": [str(p) for p in source_paths],
            "seed_model": str(seed_path) if seed_path is not None else None,
            "experts": experts,
            "shared": mix.shared,
            "router_init": mix.router_init,
            "split": split,
            "blend": mix.blend,
        }
        return output.write(plan, config, checkpoints, info, "btx mix", size_flags)
