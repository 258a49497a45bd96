"""The rollout layout: an RL step's no-grad work (rollouts, evaluation, the old and the reference
log-probs) on one whole model per rank, resharded from the training layout before it is used.

Two layouts do not keep a whole model on every rank, and need it:

    pipeline stages (parallel.pp > 1)   a rank holds its stage's CycleBlocks
    ZeRO-3                              a rank holds 1/dp of every weight, gathered in every forward

Decoding through them would run token by token through the stages (pp - 1 of pp ranks idle, a send
and a receive per token and stage), or gather every weight for every token: a collective whose count
follows the decoding length, which differs between data-parallel ranks, so a rank whose rows are done
would have to keep joining its peers' gathers. Instead every rank keeps a rollout copy: the same model
(HRMGemma, or the puzzle RecursiveReasoner under ZeRO-3) with every layer, split over the run's
tensor-parallel group exactly as the training layers are (megatron-core's layers, the same TP group).
Rollouts then are the TP-only model's, and need no collective outside the TP group, whose ranks
decode the same rows in lockstep. Before the step's rollouts the copy takes the current weights,
without a trip through disk:

    pipeline stages   each stage broadcasts its parameters (one flat tensor) to the other stages of
                      its pipeline (the ranks of one data-parallel replica and TP rank): pp broadcasts
    ZeRO-3            deepspeed.zero.GatheredParameters over the data-parallel group, in buckets of
                      the same parameters in the same order on every rank

Every rank makes the same collectives, as many times, before any decoding starts. This is the
resharding verl's hybrid engine and NeMo-RL's refit do between a Megatron/FSDP trainer and a
tensor-parallel inference engine, with our own model code as the engine: the rollouts, and the old
and reference log-probs computed on the copy, are the training forward's numbers.

The reference model's weights are kept like the policy's: on each rank its stage's parameters, or
under ZeRO-3 1/dp of the flat weights. They are put into the same copy for the reference forward (a
flat broadcast per stage, or one all-gather), as NeMo-RL swaps reference weights into its policy
model; the copy takes the policy's again before the next rollout or evaluation.

Memory: the copy holds the whole model's weights / tp in the training dtype (2 bytes per parameter
in bf16), beside the training states' 16 / (tp x pp) (ZeRO-1 lowers the optimizer's part) or 16 / dp
under ZeRO-3; the reference adds 4 bytes per parameter / (tp x pp), or / (tp x dp) under ZeRO-3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hrm_mega.checkpoint.universal import model_name
from hrm_mega.config import Config
from hrm_mega.distributed import data_parallel_group, pipeline_group
from hrm_mega.models import build_model
from hrm_mega.training import engine as ds

GATHER_BUCKET = 2**25  # elements per ZeRO-3 gather of the policy's weights (a transient copy of them)


def needs_rollout_copy(config: Config) -> bool:
    """Whether the training module is not a whole model on every rank (see the module docstring)."""
    return config.parallel.pp > 1 or config.parallel.zero_stage == 3


def stages(world: ds.World) -> int:
    """Pipeline stages of the run (1 without pipeline parallelism)."""
    return world.layout.pp if world.layout is not None else 1


def gather_over_pipeline(part: Any, world: ds.World) -> list[Any]:
    """Every stage's `part` of this rank's pipeline, in stage order, on every stage: dataclasses, dicts,
    lists and tensors (travelling through the CPU, so they land on this rank's device) or None. The
    rollouts of a replica are split over its stages this way, so that all stages train on one copy of
    each sample rather than on samples each stage drew itself."""
    group = pipeline_group()
    gathered: list[Any] = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(gathered, _map_tensors(part, lambda t: t.cpu()), group=group)
    layout = world.layout
    assert layout is not None
    ranks = torch.distributed.get_process_group_ranks(group)
    order = sorted(range(len(ranks)), key=lambda i: layout.coordinates(ranks[i])[0])
    return [_map_tensors(gathered[i], lambda t: t.to(world.device)) for i in order]


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    return value


def _owned(module: nn.Module) -> dict[str, nn.Parameter]:
    """This rank's parameters by the single-process model's names (a pipeline stage's second copy of
    the tied embedding left out: the first stage's is the one)."""
    return {
        model_name(n): p for n, p in module.named_parameters() if not getattr(p, "ds_pipe_replicated", False)
    }


class RolloutCopy:
    """The policy (and the reference) in the rollout layout, on this rank. Build it from the training
    module before DeepSpeed wraps it (it still holds the initial weights, which the reference keeps)."""

    model: nn.Module
    holds: tuple[str, int] | None = None  # ("policy", step) or ("reference", 0)

    def __init__(self, config: Config, world: ds.World, module: nn.Module, keep_reference: bool) -> None:
        self.world = world
        self.pipeline = config.parallel.pp > 1
        model = build_model(config.model).init_weights(config.train.seed)
        self.model = model.to(world.device).eval().requires_grad_(False)
        self.params = dict(self.model.named_parameters())
        self.dtype = torch.float32
        local = _owned(module)
        if self.pipeline:
            self.group = pipeline_group()
            self._find_owners(local)
        else:
            self.group = data_parallel_group()
        self.reference_share = self._reference_share(local) if keep_reference else None

    # --- what the RL step calls ---------------------------------------------------------------------

    def policy(self, module: nn.Module, step: int) -> nn.Module:
        """The copy with the training module's current weights (after `step` updates). Collective when it
        holds anything else."""
        if self.holds != ("policy", step):
            self._set_dtype(next(module.parameters()).dtype)
            local = _owned(module)
            if self.pipeline:
                self._broadcast_stages(
                    lambda names: torch.cat([local[n].detach().reshape(-1) for n in names])
                )
            else:
                self._gather_zero3(local)
            persistent = set(self.model.state_dict())
            own_buffers = {model_name(n): b for n, b in module.named_buffers()}
            with torch.no_grad():  # e.g. the puzzle model's H_init / L_init, never partitioned
                for name, b in self.model.named_buffers():
                    if name in persistent and name in own_buffers:
                        b.copy_(own_buffers[name])
            self.holds = ("policy", step)
        return self.model

    def reference(self) -> nn.Module:
        """The copy with the reference (initial) weights. Collective when it holds anything else."""
        assert self.reference_share is not None, "the run keeps no reference model (rl.beta = 0)"
        if self.holds != ("reference", 0):
            share = self.reference_share
            if self.pipeline:
                self._broadcast_stages(lambda names: share)
            else:
                parts = [torch.empty_like(share) for _ in range(self.world.dp_size)]
                torch.distributed.all_gather(parts, share, group=self.group)
                self._unflatten(torch.cat(parts), list(self.params))
            self.holds = ("reference", 0)
        return self.model

    # --- pipeline stages ----------------------------------------------------------------------------

    def _find_owners(self, local: dict[str, nn.Parameter]) -> None:
        """Which stage holds each parameter (one all-gather of flags over the pipeline group), and the
        global rank of each stage in this rank's pipeline."""
        layout = self.world.layout
        assert layout is not None
        ranks = torch.distributed.get_process_group_ranks(self.group)
        stages = [layout.coordinates(r)[0] for r in ranks]  # the group's ranks, by their stage
        self.stage_ranks = {stage: rank for stage, rank in zip(stages, ranks)}
        mine = torch.tensor([float(n in local) for n in self.params], device=self.world.device)
        flags = [torch.empty_like(mine) for _ in ranks]
        torch.distributed.all_gather(flags, mine, group=self.group)
        table = torch.stack(flags).cpu()  # [group rank, parameter]
        counts = table.sum(dim=0)
        if bool((counts != 1).any()):
            name = list(self.params)[int((counts != 1).nonzero()[0])]
            raise RuntimeError(f"the pipeline stages hold {int(counts.max())} or 0 copies of {name}")
        owner = [stages[int(i)] for i in table.argmax(dim=0)]
        self.stage_names = {s: [n for n, o in zip(self.params, owner) if o == s] for s in stages}

    def _broadcast_stages(self, flat_of: Callable[[list[str]], torch.Tensor]) -> None:
        """Fills the copy stage by stage: the stage's rank sends flat_of(its parameter names)."""
        my_stage = self.world.pp_rank
        for stage, names in sorted(self.stage_names.items()):
            if stage == my_stage:
                flat = flat_of(names).to(self.world.device, self.dtype).contiguous()
            else:
                size = sum(self.params[n].numel() for n in names)
                flat = torch.empty(size, dtype=self.dtype, device=self.world.device)
            torch.distributed.broadcast(flat, src=self.stage_ranks[stage], group=self.group)
            self._unflatten(flat, names)

    # --- ZeRO-3 -------------------------------------------------------------------------------------

    def _gather_zero3(self, local: dict[str, nn.Parameter]) -> None:
        """The policy's weights, gathered bucket by bucket (GatheredParameters over the data-parallel
        group: the same buckets, in the same order, on every rank)."""
        import deepspeed

        names = list(self.params)
        start = 0
        while start < len(names):
            end, size = start, 0
            while end < len(names) and (
                end == start or size + self.params[names[end]].numel() <= GATHER_BUCKET
            ):
                size += self.params[names[end]].numel()
                end += 1
            bucket = names[start:end]
            with deepspeed.zero.GatheredParameters([local[n] for n in bucket]), torch.no_grad():
                for n in bucket:
                    self.params[n].copy_(local[n].data.view(self.params[n].shape))
            start = end

    # --- the reference ------------------------------------------------------------------------------

    def _reference_share(self, local: dict[str, nn.Parameter]) -> torch.Tensor:
        """This rank's share of the initial weights (fp32): its stage's parameters, flat in the copy's
        order; under ZeRO-3, its 1/dp of all of them, flat (zero-padded to dp equal parts)."""
        with torch.no_grad():
            if self.pipeline:
                return torch.cat(
                    [local[n].detach().float().reshape(-1) for n in self.stage_names[self.world.pp_rank]]
                )
            flat = torch.cat([local[n].detach().float().reshape(-1) for n in self.params])
            dp = self.world.dp_size
            part = -(-flat.numel() // dp)
            flat = torch.nn.functional.pad(flat, (0, part * dp - flat.numel()))
            index = torch.distributed.get_rank(self.group) if self.group is not None else self.world.rank
            return flat[index * part : (index + 1) * part].clone()

    # --- helpers ------------------------------------------------------------------------------------

    def _set_dtype(self, dtype: torch.dtype) -> None:
        if dtype != self.dtype:  # the training module's (DeepSpeed casts it for bf16)
            self.model.to(dtype)
            self.dtype = dtype

    @torch.no_grad()
    def _unflatten(self, flat: torch.Tensor, names: list[str]) -> None:
        offset = 0
        for n in names:
            p = self.params[n]
            p.copy_(flat[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
