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


def cli_options(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The flags among `names` that were given (not None), as keywords."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def run_upcycle(args: argparse.Namespace) -> None:
    names = ("granularity", "mode", "router_type", "num_experts_per_tok", "noise", "router_std", "seed")
    out = conversion.upcycle(
        args.source,
        args.output_dir,
        num_experts=args.num_experts,
        **cli_options(args, (*names, *WRITER_OPTIONS, *CONTROLLER_OPTIONS)),
    )
    print(f"remoe upcycle: wrote {out}")


def run_convert(args: argparse.Namespace) -> None:
    names = ("num_experts_per_tok", *WRITER_OPTIONS, *CONTROLLER_OPTIONS)
    out = conversion.convert(args.source, args.output_dir, router_type=args.router_type, **cli_options(args, names))
    print(f"remoe convert: wrote {out}")
