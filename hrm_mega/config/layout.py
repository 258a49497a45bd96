"""The 3D layout (tensor x data x pipeline) as arithmetic on the config: which world sizes fit, which
model sizes tensor parallelism splits, how pipeline stages share the CycleBlocks. Pure, so the CLI and
the launcher check a layout before any process starts (hrm_mega.distributed builds the groups).

Rank order is tensor-parallel fastest, then data-parallel, then pipeline stage:

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hrm_mega.config.model import LMModelConfig, PuzzleModelConfig, swiglu_intermediate
from hrm_mega.config.schema import ConfigError


class _ParallelFields(Protocol):
    tp: int
    pp: int
    pp_blocks: list[int]


class LayoutSource(Protocol):
    """What the layout arithmetic reads of a Config (its model and parallel sections)."""

    @property
    def model(self) -> PuzzleModelConfig | LMModelConfig: ...

    @property
    def parallel(self) -> _ParallelFields: ...


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return rank // (self.tp * self.dp), (rank // self.tp) % self.dp, rank % self.tp


def resolve_layout(config: LayoutSource, world_size: int) -> Layout:
    """The layout of `world_size` ranks under config.parallel, or a one-line ConfigError naming the
    fields (the model checks of check_model_layout included)."""
    tp, pp = config.parallel.tp, config.parallel.pp
    if world_size < 1 or world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not parallel.tp x parallel.pp x dp: tp {tp} x pp {pp} = {tp * pp} "
            "does not divide it; launch a multiple of tp x pp ranks"
        )
    check_model_layout(config)
    return Layout(tp, pp, world_size // (tp * pp))


def check_model_layout(config: LayoutSource) -> None:
    """The model's sizes against parallel.tp and its CycleBlocks against parallel.pp (any world size)."""
    m, tp = config.model, config.parallel.tp
    for name, value in tp_split_sizes(m).items():
        if value % tp:
            raise ConfigError(f"model.{name}={value} is not divisible by parallel.tp={tp}")
    if m.vocab_size % tp:
        padded = -(m.vocab_size // -tp) * tp
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={tp}; pad it: set "
            f"model.vocab_size={padded} (the data's token ids stay below it)"
        )
    if config.parallel.pp > 1 and isinstance(m, LMModelConfig):  # puzzle + pp: refused by Config
        pipeline_stage_blocks(config)


def tp_split_sizes(m: PuzzleModelConfig | LMModelConfig) -> dict[str, int]:
    """Model sizes that tensor parallelism splits, by config field name."""
    if isinstance(m, LMModelConfig):
        return {
            "num_heads": m.num_heads,
            "num_kv_heads": m.num_kv_heads,
            "intermediate_size": m.intermediate_size,
        }
    sizes = {"expansion (MLP width)": swiglu_intermediate(m.hidden_size, m.expansion)}
    if m.token_mixer == "attention":
        sizes["num_heads"] = m.num_heads
    else:
        total_len = m.seq_len + m.prefix_len
        sizes["expansion (sequence-MLP width)"] = swiglu_intermediate(total_len, m.expansion)
    return sizes


def pipeline_stage_blocks(config: LayoutSource) -> list[int]:
    """How many CycleBlocks each pipeline stage holds: parallel.pp_blocks if given, else an even split."""
    m = config.model
    if not isinstance(m, LMModelConfig):
        raise ConfigError(f"parallel.pp applies to model.family=hrm_gemma, not {m.family}")
    pp, groups, given = config.parallel.pp, m.num_groups, config.parallel.pp_blocks
    if given:
        if len(given) != pp or sum(given) != groups or min(given) < 1:
            raise ConfigError(
                f"parallel.pp_blocks={given} must list {pp} positive CycleBlock counts (one per stage) "
                f"summing to the model's {groups} CycleBlocks"
            )
        return list(given)
    if groups % pp:
        raise ConfigError(
            f"parallel.pp={pp} does not divide the model's {groups} CycleBlocks "
            f"(model.num_layers // (model.local_per_global + 1)); change parallel.pp or give "
            "parallel.pp_blocks, e.g. [2, 1]"
        )
    return [groups // pp] * pp
