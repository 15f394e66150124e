"""`remoe generate`: text from a checkpoint with `model.generate` (plain prompts or the tokenizer's chat template,
printed at the end or streamed as it is generated), optionally with the experts each new token used."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import GenerationConfig, TextStreamer, set_seed
from transformers.utils import GENERATION_CONFIG_NAME

from remoe.checkpoints import check_checkpoint, load_model, load_tokenizer, resolve_device
from remoe.modeling_remoe import active_experts

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_NEW_TOKENS = 64
# What `--show_routing`'s counts mean where they are not the experts a router picked for the token.
ROUTING_NOTES = {
    "lory": "lory merges all experts softly per segment: each count is the dominant expert (1)",
    "expert_choice": "expert_choice at inference: each token takes its top-k experts (batch-level routing is "
    "training only)",
}


def _validate(
    prompts: list[str],
    max_new_tokens: int | None,
    do_sample: bool,
    temperature: float,
    top_p: float,
    dtype: str,
    chat: bool,
    system: str | None,
) -> None:
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("--prompt: every prompt must be non-empty text")
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens (--max_new_tokens) must be an integer >= 1, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature (--temperature) must be a finite number > 0, got {temperature}")
    if not 0 < top_p <= 1:  # also refuses nan
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not do_sample and (temperature != 1.0 or top_p != 1.0):
        raise ValueError("--temperature and --top_p apply to sampling: add --do_sample (greedy decoding ignores them)")
    if system is not None and not chat:
        raise ValueError("--system is the system message of a chat: add --chat")
    if system is not None and not system:
        raise ValueError("--system: the system message must be non-empty text")


def check_inference_device(device: str | None) -> str:
    """`--device` resolved (`resolve_device`: default cuda when there is a GPU, else cpu), and one a model can run
    on: cpu, cuda[:N], or mps where Apple's backend is available."""
    resolved = resolve_device(device)
    kind = torch.device(resolved).type
    allowed = ["cpu", "cuda", *(["mps"] if torch.backends.mps.is_available() else [])]
    if kind not in allowed:
        raise ValueError(f"--device {device!r}: must be one of {allowed} (or cuda:N), got the device type {kind!r}")
    return resolved


def _new_tokens(max_new_tokens: int | None, prompt_length: int, max_positions: int, model_dir: str) -> int:
    """The tokens to generate after a prompt of `prompt_length` tokens: `max_new_tokens`, by default 64 or what
    `max_positions` leaves; `ValueError` naming `--max_new_tokens` (or `--prompt`) when they exceed the context."""
    room = max_positions - prompt_length
    if room < 1:
        raise ValueError(
            f"--prompt: the prompt is {prompt_length} tokens long, and {model_dir} has max_position_embeddings "
            f"{max_positions}: no room for a new token; shorten the prompt"
        )
    if max_new_tokens is None:
        return min(DEFAULT_MAX_NEW_TOKENS, room)
    if max_new_tokens > room:
        raise ValueError(
            f"--max_new_tokens {max_new_tokens}: the prompt ({prompt_length} token{'s' if prompt_length != 1 else ''}) "
            f"and the new tokens exceed the model's max_position_embeddings ({max_positions}); use --max_new_tokens "
            f"{room} or less"
        )
    return max_new_tokens


def _check_chat_template(tokenizer, model_dir: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"--chat: the tokenizer in {model_dir} has no chat template (tokenizer_config.json or "
            "chat_template.jinja); drop --chat to complete the prompts as plain text"
        )


def _chat_inputs(tokenizer, prompt: str, system: str | None) -> dict:
    """The prompt as one user turn (after the system message, if any) through the tokenizer's chat template, ending
    with the assistant's generation prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


@torch.no_grad()
def experts_per_new_token(model, sequence: torch.Tensor, prompt_length: int) -> list[list[int]]:
    """For each token after the prompt, the number of experts it used in each MoE layer (`active_experts`, the
    inference rule: per-token top-k for Expert Choice, the dominant expert of the segment's merge for Lory).

    The whole sequence is routed in one forward without a KV cache. Every router but Lory's routes a token from its
    own past, so this is the routing generation used. Lory (which generates without a cache, recomputing the sequence
    at every step) routes segment j from segment j - 1, also the same here, except the first segment, routed by its
    own mean: here that of the whole first segment, during generation that of the tokens so far. Its count is one
    (the dominant expert) either way."""
    router_logits = model(sequence[None], output_router_logits=True, use_cache=False).router_logits
    counts = torch.stack([active_experts(logits, model.config).sum(-1) for logits in router_logits], dim=1)
    return counts[prompt_length:].tolist()


def check_generation_config(model_dir: str) -> None:
    """The checkpoint's `generation_config.json`, if it has one, must be a valid generation config: Transformers
    otherwise skips a file that is not JSON and fails inside `generate` on a wrong value."""
    path = Path(model_dir) / GENERATION_CONFIG_NAME
    if not path.exists():
        return
    try:
        GenerationConfig.from_pretrained(model_dir).validate()
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a valid generation config ({' '.join(str(error).split())})") from error


def generate(
    model_dir: str,
    prompts: list[str],
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "auto",
    experts_implementation: str | None = None,
    show_routing: bool = False,
    chat: bool = False,
    system: str | None = None,
    stream: bool = False,
) -> list[dict]:
    """Complete each prompt; with `chat`, answer it as a user turn of the tokenizer's chat template (after `system`);
    with `stream`, print each prompt and its completion to stdout as the tokens are generated; with
    `show_routing`, also report the experts every generated token used per layer.

    `max_new_tokens` (default: 64, or fewer where the model's `max_position_embeddings` leaves less room after the
    prompt) must fit in `max_position_embeddings` with every prompt; all prompts are checked before the model loads."""
    _validate(prompts, max_new_tokens, do_sample, temperature, top_p, dtype, chat, system)
    device = check_inference_device(device)
    config = check_checkpoint(model_dir)
    check_generation_config(model_dir)
    if show_routing and not config.has_experts:
        raise ValueError(
            f"--show_routing needs a ReMoE model with experts (any router_type but dense); {model_dir} is dense"
        )
    tokenizer = load_tokenizer(model_dir)
    if chat:
        _check_chat_template(tokenizer, model_dir)
    encoded = [
        _chat_inputs(tokenizer, prompt, system) if chat else tokenizer(prompt, return_tensors="pt")
        for prompt in prompts
    ]
    new_tokens = [
        _new_tokens(max_new_tokens, inputs["input_ids"].shape[1], config.max_position_embeddings, model_dir)
        for inputs in encoded
    ]
    load_options = {"dtype": dtype}
    if experts_implementation is not None:
        load_options["experts_implementation"] = experts_implementation
    model = load_model(model_dir, **load_options).to(device).eval()
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    set_seed(seed)
    results = []
    for prompt, inputs, prompt_new_tokens in zip(prompts, encoded, new_tokens, strict=True):
        inputs = inputs.to(device)
        prompt_length = inputs["input_ids"].shape[1]
        streamer = None
        if stream:
            print(prompt_heading(prompt, chat), end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        output = model.generate(
            **inputs,
            max_new_tokens=prompt_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=top_p if do_sample else None,
            pad_token_id=pad_token_id,
            streamer=streamer,
        )
        new_ids = output[0, prompt_length:]
        result = {"prompt": prompt, "completion": tokenizer.decode(new_ids, skip_special_tokens=True)}
        if show_routing:
            per_layer = experts_per_new_token(model, output[0], prompt_length)
            result["routing"] = [
                {"token": tokenizer.decode([token_id]), "experts_per_layer": counts}
                for token_id, counts in zip(new_ids.tolist(), per_layer, strict=True)
            ]
            if config.router_type in ROUTING_NOTES:
                result["routing_note"] = ROUTING_NOTES[config.router_type]
        results.append(result)
    return results


def prompt_heading(prompt: str, chat: bool) -> str:
    """What the text output prints before a completion: the prompt it continues, or the user's turn of a chat."""
    return f"> {prompt}\n" if chat else prompt


def _print_routing(result: dict) -> None:
    if "routing_note" in result:
        print(f"  ({result['routing_note']})")
    for entry in result.get("routing", []):
        counts = entry["experts_per_layer"]
        print(f"  {entry['token']!r:>16}  experts per layer {counts}  mean {sum(counts) / len(counts):.2f}")


def run(args: argparse.Namespace) -> None:
    if args.stream and args.json:
        raise ValueError("--stream prints text as it is generated; --json prints the results at the end: pick one")
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
        chat=args.chat,
        system=args.system,
        stream=args.stream,
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for result in results:
        if not args.stream:
            print(prompt_heading(result["prompt"], args.chat) + result["completion"])
        _print_routing(result)
