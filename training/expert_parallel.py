"""Expert parallelism for ReMoE through DeepSpeed's expert-parallel process groups.

`enable_expert_parallel(model, N)` replaces every MoE layer's `mlp.experts` (E experts) by an `ExpertParallelExperts`
holding the E/N experts of this rank's position in its expert-parallel group (DeepSpeed's `ep_size_N` groups: ranks
`[0..N-1]`, `[N..2N-1]`, ...). The router stays replicated, so every rank routes its own tokens; the nonzero
(token, expert) pairs travel to the experts' ranks with a dropless `all_to_all_single` (uneven splits), the experts
run there through the model's own `ReMoEExperts` (whichever experts implementation the model is set to), and a second
all-to-all brings the outputs back, where they are weighted by the gates and summed. Both all-to-alls are differentiable (backward is the reverse all-to-all), and gate
gradients never leave the rank that owns the token. The result is the same function as one process holding all E
experts.

The expert weights are DeepSpeed MoE parameters (`allreduce=False`, `group_name="ep_size_N"`) laid out like DeepSpeed's
native MoE (`deepspeed_moe.experts.deepspeed_experts.<i>.{gate_up_proj,down_proj}`) and the module is a
`deepspeed.moe.layer.MoE`, so the DeepSpeed engine reduces their gradients over the expert-data-parallel group (scaled
by the full data-parallel size), shards their optimizer state over that group, and writes and reads one checkpoint
file per expert. `gather_experts` / `full_experts_view` turn the model back into a plain ReMoE model (E experts per
layer, Transformers names) for saving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from remoe.modeling_remoe import ReMoEExperts, ReMoEForCausalLM, ReMoELoryMoeBlock

try:  # DeepSpeed recognises expert-parallel layers (and their checkpoint layout) by this base class.
    from deepspeed.moe.layer import MoE as _DeepSpeedMoE
except ImportError:  # pragma: no cover - expert parallelism needs deepspeed; the error comes from `_groups()`
    _DeepSpeedMoE = nn.Module

__all__ = [
    "ExpertParallelExperts",
    "all_to_all",
    "enable_expert_parallel",
    "expert_parallel_group_name",
    "expert_parallel_size",
    "full_experts_view",
    "gather_experts",
]


def expert_parallel_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel group of size `ep_size` (also the MoE params' `group_name`)."""
    return f"ep_size_{ep_size}"


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits; its backward is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, tensor, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        tensor = tensor.contiguous()
        output = tensor.new_empty((sum(output_splits), *tensor.shape[1:]))
        dist.all_to_all_single(output, tensor, output_splits, input_splits, group=group)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        grad = _AllToAll.apply(grad_output.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group)
        return grad, None, None, None


def all_to_all(tensor: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable `all_to_all_single`: rows `input_splits[r]` go to rank r, `output_splits[r]` come from rank r."""
    return _AllToAll.apply(tensor, list(output_splits), list(input_splits), group)


class _Container(nn.Module):
    """A named level of DeepSpeed's native MoE layout (`deepspeed_moe`, `deepspeed_moe.experts`)."""


class _LocalExpert(nn.Module):
    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, group_name: str):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj)  # (2I, H)
        self.down_proj = nn.Parameter(down_proj)  # (H, I)
        for parameter in (self.gate_up_proj, self.down_proj):
            parameter.allreduce = False  # DeepSpeed: an expert parameter, reduced over the expert-data-parallel group
            parameter.group_name = group_name


class ExpertParallelExperts(_DeepSpeedMoE):
    """This rank's E/N experts of one MoE layer, with the experts contract of `ReMoEExperts`:
    `forward(hidden_states (R, H), top_k_index (R, K), top_k_weights (R, K)) -> (R, H)`.

    Every rank of the expert-parallel group must call `forward` the same number of times (training, evaluation and
    generation all run in lockstep), since each call does three all-to-alls.
    """

    def __init__(self, experts: ReMoEExperts, group, group_name: str):
        nn.Module.__init__(self)  # not MoE.__init__: that builds DeepSpeed's own TopK gate and experts
        self.config = experts.config
        self.ep_group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.expert_group_name = group_name
        self.num_experts = experts.num_experts
        if self.num_experts % self.ep_size:
            raise ValueError(
                f"expert_parallel_size={self.ep_size} must divide the number of experts per layer ({self.num_experts})"
            )
        self.num_local_experts = self.num_experts // self.ep_size
        first = self.ep_rank * self.num_local_experts
        local = [
            _LocalExpert(
                experts.gate_up_proj.detach()[first + i].clone(),
                experts.down_proj.detach()[first + i].clone(),
                group_name,
            )
            for i in range(self.num_local_experts)
        ]
        self.deepspeed_moe = _Container()
        self.deepspeed_moe.experts = _Container()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(local)
        # The local experts run through the model's own experts module (its registry of implementations, chosen by
        # `config._experts_implementation`), called with this rank's weights. Built on the meta device and kept in a
        # tuple: it owns no parameters and is no submodule.
        with torch.device("meta"):
            runner = ReMoEExperts(self.config)
        runner.num_experts = self.num_local_experts
        self._experts_runner = (runner,)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine; the groups already exist (created by `enable_expert_parallel`)."""

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The local experts as `(E/N, 2I, H)` and `(E/N, H, I)` tensors (differentiable; a view when E/N = 1)."""
        if self.num_local_experts == 1:
            expert = self.local_experts[0]
            return expert.gate_up_proj.unsqueeze(0), expert.down_proj.unsqueeze(0)
        return (
            torch.stack([expert.gate_up_proj for expert in self.local_experts]),
            torch.stack([expert.down_proj for expert in self.local_experts]),
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Rows (R, H) routed to experts `top_k_index (R, K)` with `top_k_weights (R, K)`, as `ReMoEExperts`."""
        group, ep_size, num_local = self.ep_group, self.ep_size, self.num_local_experts
        num_rows, top_k = top_k_index.shape
        # (row, expert) pairs sorted by expert, hence by destination rank.
        expert_idx, order = torch.sort(top_k_index.reshape(-1), stable=True)
        row_idx = torch.arange(num_rows, device=top_k_index.device).repeat_interleave(top_k)[order]
        weights = top_k_weights.reshape(-1)[order]
        send_counts = torch.bincount(expert_idx, minlength=self.num_experts)  # (E,) = (N, E/N) per rank, local expert
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        recv_counts = recv_counts.view(ep_size, num_local)  # [source rank, local expert]
        input_splits = send_counts.view(ep_size, num_local).sum(1).tolist()
        output_splits = recv_counts.sum(1).tolist()

        received = all_to_all(hidden_states[row_idx], output_splits, input_splits, group)
        # Each received row goes to one local expert, with weight 1: the gate is applied on the row's own rank.
        local_expert = torch.repeat_interleave(
            torch.arange(num_local, device=top_k_index.device).repeat(ep_size),
            recv_counts.flatten(),
            output_size=received.shape[0],
        )
        gate_up_proj, down_proj = self.local_weights()
        expert_out = torch.func.functional_call(
            self._experts_runner[0],
            {"gate_up_proj": gate_up_proj, "down_proj": down_proj},
            (received, local_expert[:, None], received.new_ones(received.shape[0], 1)),
        )
        if expert_out.grad_fn is None and torch.is_grad_enabled():
            # No row reached this rank's experts and the path returned a constant: keep the graph connected so that
            # this rank joins the backward all-to-all like the others, and its experts get zero gradients, not None.
            expert_out = expert_out + (received.sum() + gate_up_proj.sum() + down_proj.sum()) * 0
        returned = all_to_all(expert_out, input_splits, output_splits, group)

        weighted = returned * weights.to(returned.dtype)[:, None]
        return torch.zeros_like(hidden_states).index_add_(0, row_idx, weighted.to(hidden_states.dtype))

    @torch.no_grad()
    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All E experts of the layer, `(E, 2I, H)` and `(E, H, I)`, on every rank of the expert-parallel group."""
        full = []
        for local in self.local_weights():
            parts = [torch.empty_like(local) for _ in range(self.ep_size)]
            dist.all_gather(parts, local.contiguous(), group=self.ep_group)
            full.append(torch.cat(parts))
        return full[0], full[1]

    def extra_repr(self) -> str:
        return f"experts {self.ep_rank * self.num_local_experts}..{(self.ep_rank + 1) * self.num_local_experts - 1} of {self.num_experts}, ep_size={self.ep_size}"


def _moe_blocks(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if hasattr(module, "router") and hasattr(module, "experts"):
            yield module


def expert_parallel_size(model: nn.Module) -> int:
    """N of the model's expert-parallel layers, 1 if it has none."""
    sizes = {module.ep_size for module in model.modules() if isinstance(module, ExpertParallelExperts)}
    return sizes.pop() if sizes else 1


def _groups():
    try:
        import deepspeed
        from deepspeed.utils import groups
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ValueError(
            "expert_parallel_size > 1 needs DeepSpeed: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed"
        ) from error
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
    return groups


def enable_expert_parallel(model: ReMoEForCausalLM, ep_size: int) -> ReMoEForCausalLM:
    """Shard every MoE layer's experts over DeepSpeed's expert-parallel group of size `ep_size` (in place).

    Needs an initialised process group whose world size `ep_size` divides. All ranks must call it; the full expert
    weights are first broadcast from global rank 0, so the sharded model is exactly rank 0's model whatever each
    rank initialised.
    """
    if ep_size < 1:
        raise ValueError(f"expert_parallel_size must be >= 1, got {ep_size}")
    if ep_size == 1 or expert_parallel_size(model) == ep_size:
        return model
    if any(isinstance(module, ReMoELoryMoeBlock) for module in model.modules()):
        raise ValueError(
            "expert_parallel_size > 1 does not apply to router_type='lory': every segment merges the parameters of "
            "all experts, so there are no (token, expert) pairs to send to the experts' ranks"
        )
    if expert_parallel_size(model) != 1:
        raise ValueError(f"the model is already expert-parallel with ep_size={expert_parallel_size(model)}")
    if not dist.is_initialized():
        raise ValueError(f"expert_parallel_size={ep_size} needs torch.distributed (launch with torchrun or deepspeed)")
    world_size = dist.get_world_size()
    if world_size % ep_size:
        raise ValueError(f"expert_parallel_size={ep_size} must divide the world size ({world_size})")
    blocks = list(_moe_blocks(model))
    for block in blocks:
        if block.experts.num_experts % ep_size:
            raise ValueError(
                f"expert_parallel_size={ep_size} must divide the number of experts per layer "
                f"({block.experts.num_experts})"
            )
    groups = _groups()
    group_name = expert_parallel_group_name(ep_size)
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    group = groups._get_expert_parallel_group(group_name)
    device = _communication_device()
    for block in blocks:
        with torch.no_grad():
            for parameter in (block.experts.gate_up_proj, block.experts.down_proj):
                buffer = parameter.data.to(device)
                dist.broadcast(buffer, src=0)
                parameter.data.copy_(buffer)
        block.experts = ExpertParallelExperts(block.experts, group, group_name)
    return model


def _communication_device() -> torch.device:
    """Where collectives take their tensors: CPU for gloo, the current accelerator for nccl and friends."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def gather_experts(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`{module name: (gate_up_proj (E, 2I, H), down_proj (E, H, I))}` of every expert-parallel layer (collective)."""
    return {
        name: module.gather() for name, module in model.named_modules() if isinstance(module, ExpertParallelExperts)
    }


@contextlib.contextmanager
def full_experts_view(model: nn.Module, materialize: bool = True):
    """Temporarily give `model` plain `ReMoEExperts` with all E experts (gathered from the expert-parallel group).

    A collective: every rank must enter it. Ranks with `materialize=False` only contribute their experts. Inside the
    block the model is an ordinary ReMoE model (e.g. for `save_pretrained`); on exit the expert-parallel layers are
    put back, untouched.
    """
    gathered = gather_experts(model)
    if not materialize or not gathered:
        yield model
        return
    replaced = []
    for name, (gate_up_proj, down_proj) in gathered.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        sharded = getattr(parent, attribute)
        with torch.device("meta"):
            full = ReMoEExperts(sharded.config)
        full.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        full.down_proj = nn.Parameter(down_proj, requires_grad=False)
        setattr(parent, attribute, full)
        replaced.append((parent, attribute, sharded))
    try:
        yield model
    finally:
        for parent, attribute, sharded in replaced:
            setattr(parent, attribute, sharded)
