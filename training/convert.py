"""The conversion commands: `remoe upcycle` (sparse upcycling of a dense checkpoint, `remoe.conversion.upcycle`) and
`remoe convert` (Mixtral / ReMoE MoE -> ReMoE with ReLU or TopK routing, dense Llama-family -> dense ReMoE,
`remoe.conversion.convert`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from remoe import conversion

# Flags that every conversion command passes on: where and how the result is written, and its controller fields.
WRITER_OPTIONS = ("dtype", "max_shard_size", "overwrite")
CONTROLLER_OPTIONS = conversion.CONTROLLER_FIELDS
# TopK routing of the result (`--[no_]router_renormalize`, `--[no_]router_sampling`).
TOPK_ROUTING_OPTIONS = ("router_renormalize", "router_sampling")


def cli_options(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags among `names` that were given (not None), as keywords."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run_upcycle(args: argparse.Namespace) -> None:
    names = ("granularity", "mode", "router_type", "num_experts_per_tok", *TOPK_ROUTING_OPTIONS, "noise", "router_std")
    out = conversion.upcycle(
        args.source,
        args.output_dir,
        num_experts=args.num_experts,
        **cli_options(args, (*names, "seed", *WRITER_OPTIONS, *CONTROLLER_OPTIONS)),
    )
    print(f"remoe upcycle: wrote {out}")


def run_convert(args: argparse.Namespace) -> None:
    names = ("num_experts_per_tok", *TOPK_ROUTING_OPTIONS, *WRITER_OPTIONS, *CONTROLLER_OPTIONS)
    out = conversion.convert(args.source, args.output_dir, router_type=args.router_type, **cli_options(args, names))
    print(f"remoe convert: wrote {out}")
