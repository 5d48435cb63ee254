"""Data-parallel training under `torchrun` / `accelerate launch`: DDP or FSDP2 on torch.distributed.

    torchrun --nproc_per_node 2 -m potstill.cli train --capture runs/cap --out runs/student
    torchrun --nproc_per_node 2 -m potstill.cli train --dist fsdp ...
    accelerate launch --multi_gpu --num_processes 2 -m potstill.cli train ...   # also on a CPU

The loop in loop.py stays one function; this file holds what differs between one process and
many: process-group setup (gloo on CPU, nccl on GPU, from the launcher's RANK/WORLD_SIZE env),
the model wrapper (DDP, or FSDP2 `fully_shard` per decoder layer + one root unit), each rank's
share of a step's micro-batches, the reductions of per-step numbers, and full state dicts
gathered for checkpoints and the saved student. One process: no group, no wrapper, same code.

Why torch.distributed and not Accelerate's `Accelerator`: the loop already does its own
accumulation, loss normalisation, autocast and checkpoints; Accelerator would re-wrap each of
those. `accelerate launch` only sets the same env variables as torchrun, so both launchers work.

Equivalence with one process: a step consumes world x grad_accum micro-batches of the data
stream (the same stream one process reads), rank r takes the r-th contiguous block of grad_accum.
The loss is normalised by the step's learned tokens summed over ranks; DDP/FSDP average the
gradients over ranks, so each rank scales its loss by `world` to recover the sum. Checkpoints hold
full (unsharded) state dicts keyed by parameter name, so any mode resumes any other's checkpoint.

FSDP on CPU (torch 2.13): FSDP2 (`torch.distributed.fsdp.fully_shard`) runs on gloo with its
default gradient averaging (gloo has no PREMUL_SUM, so no custom divide factor); FSDP1 is not
used. Parameters, gradients and optimizer state are sharded. Limits: no FSDP mixed-precision
policy (bf16 is the loop's autocast) and no CPU offload; checkpoints and the saved student are
gathered in full into rank 0's CPU memory; a micro-batch that skips the gradient sync keeps
unsharded gradients until the step's last one; every rank reads the checkpoint file, so several
machines need a shared filesystem. Only `potstill train` is distributed (not `run`/`demo`).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from potstill.errors import PotstillError
from potstill.train.data import Batch, student_logits

MODES = ("auto", "ddp", "fsdp")


@dataclass
class Dist:
    """Where this process stands: mode ('none', 'ddp', 'fsdp'), rank, world size, device."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous block of a step's world x grad_accum micro-batches."""
        per = len(items) // self.world
        return items[self.rank * per : (self.rank + 1) * per]

    def sum(self, *values: float) -> list[float]:
        """Sums over ranks of a few numbers (in float64: token counts stay exact and stay ints)."""
        return self._reduce(values, tdist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._reduce([value], tdist.ReduceOp.MAX)[0]

    def gather(self, value: float) -> list[float]:
        """One number from each rank, in rank order."""
        if self.world == 1:
            return [value]
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        tdist.all_gather(out, t)
        return [float(x) for x in out]

    def _reduce(self, values, op) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        tdist.all_reduce(t, op=op)
        return [int(x) if isinstance(v, int) else x for v, x in zip(values, t.tolist(), strict=True)]

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def main_first(self, fn: Callable, *args, **kwargs):
        """Run fn on rank 0 first (e.g. a conversion that writes a cache), then on the others."""
        if not self.is_main:
            self.barrier()
        result = fn(*args, **kwargs)
        if self.is_main:
            self.barrier()
        return result

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()
            self.owns_group = False


def setup(mode: str = "auto") -> Dist:
    """Join the launcher's process group when WORLD_SIZE > 1 (mode 'auto' means DDP there)."""
    if mode not in MODES:
        raise PotstillError(f"train: dist must be one of {', '.join(MODES)}, not {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    owns = False
    if not tdist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        tdist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    return Dist(
        mode="ddp" if mode == "auto" else mode,
        rank=tdist.get_rank(),
        world=tdist.get_world_size(),
        device=device,
        owns_group=owns,
    )


class TargetLogits(nn.Module):
    """The student's forward as one module (logits at learned positions only), so DDP's and
    FSDP's hooks run around it: they only see calls that go through a wrapped module."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, input_ids, attention_mask, rows, cols, position_ids=None):
        batch = SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask, rows=rows, cols=cols,
                                position_ids=position_ids)
        return student_logits(self.student, batch, with_aux=True)


def wrap(model: nn.Module, ctx: Dist) -> Callable[..., torch.Tensor]:
    """forward(batch, sync=True) -> (logits [N, V], MoE router aux loss or None); call it before building the optimizer (FSDP
    swaps the parameters for sharded ones). sync=False skips the gradient all-reduce for a
    micro-batch that is not a step's last (an optimisation only: averaging keeps it correct)."""
    if ctx.mode == "none":
        return lambda batch, sync=True: student_logits(model, batch, with_aux=True)
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            TargetLogits(model),
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            forward_sync_buffers=False,  # rotary tables etc. are the same on every rank
            find_unused_parameters=_has_experts(model),  # MoE: experts without tokens get no grad
        )

        def forward(batch: Batch, sync: bool = True) -> torch.Tensor:
            with nullcontext() if sync else ddp.no_sync():
                return ddp(batch.input_ids, batch.attention_mask, batch.rows, batch.cols, batch.position_ids)

        return forward
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # ranks built the same student; make sure before each keeps a shard
        for t in [*model.parameters(), *model.buffers()]:
            tdist.broadcast(t.data, src=0)
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    root = fully_shard(TargetLogits(model), mesh=mesh)  # embeddings, final norm, (tied) head

    def forward(batch: Batch, sync: bool = True) -> torch.Tensor:
        root.set_requires_gradient_sync(sync)
        return root(batch.input_ids, batch.attention_mask, batch.rows, batch.cols, batch.position_ids)

    return forward


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation (gradient) checkpointing per decoder layer; transformers >= 5.x
    names it `activation_checkpointing_enable`, earlier `gradient_checkpointing_enable`."""
    kwargs = {"use_reentrant": False}  # works with DDP/FSDP and with inputs that need no grad
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _has_experts(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return any(getattr(cfg, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def grad_norm(total) -> float:
    """clip_grad_norm_'s result as a float (under FSDP it is a replicated DTensor)."""
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


# -- full state dicts (checkpoints, the saved student) ------------------------------------------


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model: nn.Module, optimizer, ctx: Dist) -> dict[str, Any] | None:
    """{'model', 'optimizer'} keyed by parameter name, unsharded, on rank 0 (None elsewhere).
    Every rank must call it (FSDP gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(cpu_offload=ctx.world > 1))
    return {"model": model_sd, "optimizer": optim_sd} if ctx.is_main else None


def load_full_state(model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Load a full_state() checkpoint into a plain, DDP or FSDP student (each rank reads the file)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if any(isinstance(p, int) for g in state["optimizer"].get("param_groups", []) for p in g["params"]):
        # written before checkpoints were keyed by name: a plain optimizer.state_dict() (no FSDP)
        if any(hasattr(p, "full_tensor") for p in model.parameters()):
            raise PotstillError("an older potstill wrote this checkpoint: resume it in one process or DDP")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        options=_options(),
    )


def full_model_state(model: nn.Module, ctx: Dist) -> dict[str, torch.Tensor] | None:
    """FSDP: the gathered full state dict for save_pretrained on rank 0; otherwise None (the model
    itself holds full weights). Every rank must call it."""
    if ctx.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(cpu_offload=True))
    # a tied parameter comes back once per name as separate tensors, which save_pretrained would
    # write twice: keep the first name of each (as named_parameters does), like a plain save
    first = {n for n, _ in model.named_parameters()}
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - first
    return {k: v for k, v in sd.items() if k not in tied} if ctx.is_main else None


# -- memory ---------------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak from here (training), not from building the student (which loads the teacher)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets this process's resident-set high-water mark (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory; CPU: this process's peak resident set (VmHWM, which
    reset_peak_memory can lower; elsewhere getrusage's lifetime ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
