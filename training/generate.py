"""`remoe generate`: text from a checkpoint with `model.generate`, optionally with the experts each new token used."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from remoe.kernels import IMPLEMENTATIONS

from .routing import active_experts

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _validate(model_dir: str, max_new_tokens: int, temperature: float, top_p: float, dtype: str) -> None:
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"model_dir {model_dir!r} is not a model folder (no config.json)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


@torch.no_grad()
def experts_per_new_token(model, sequence: torch.Tensor, prompt_length: int) -> list[list[int]]:
    """For each token after the prompt, the number of experts it used in each MoE layer."""
    router_logits = model(sequence[None], output_router_logits=True, use_cache=False).router_logits
    counts = torch.stack([active_experts(logits, model.config).sum(-1) for logits in router_logits], dim=1)
    return counts[prompt_length:].tolist()


def generate(
    model_dir: str,
    prompts: list[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "auto",
    experts_implementation: str | None = None,
    show_routing: bool = False,
) -> list[dict]:
    """Complete each prompt; with `show_routing`, also report the experts every generated token used per layer."""
    _validate(model_dir, max_new_tokens, temperature, top_p, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    load_options = {"dtype": dtype, "use_safetensors": True}
    if experts_implementation is not None:
        load_options["experts_implementation"] = experts_implementation
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load_options).to(device).eval()
    if show_routing and getattr(model.config, "router_type", None) not in ("relu", "topk"):
        raise ValueError(f"show_routing needs a ReMoE model with router_type relu or topk ({model_dir})")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    set_seed(seed)
    results = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        prompt_length = inputs["input_ids"].shape[1]
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            pad_token_id=pad_token_id,
        )
        new_ids = output[0, prompt_length:]
        result = {"prompt": prompt, "completion": tokenizer.decode(new_ids, skip_special_tokens=True)}
        if show_routing:
            per_layer = experts_per_new_token(model, output[0], prompt_length)
            result["routing"] = [
                {"token": tokenizer.decode([token_id]), "experts_per_layer": counts}
                for token_id, counts in zip(new_ids.tolist(), per_layer, strict=True)
            ]
        results.append(result)
    return results


def add_generate_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="complete prompts with a checkpoint (model.generate)")
    parser.add_argument("model_dir")
    parser.add_argument("--prompt", nargs="+", required=True, help="one or more prompts")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="auto")
    parser.add_argument("--experts_implementation", choices=IMPLEMENTATIONS)
    parser.add_argument(
        "--show_routing", action="store_true", help="print how many experts each new token used in each layer"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> None:
    results = generate(
        args.model_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        experts_implementation=args.experts_implementation,
        show_routing=args.show_routing,
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        print(result["prompt"] + result["completion"])
        for entry in result.get("routing", []):
            counts = entry["experts_per_layer"]
            print(f"  {entry['token']!r:>16}  experts per layer {counts}  mean {sum(counts) / len(counts):.2f}")
