"""Process groups of the 3D layout (tensor x data x pipeline); seeding; rank helpers.

Rank order is tensor-parallel fastest, then data-parallel, then pipeline stage:

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model) and megatron-core's parallel_state
(order tp-cp-ep-dp-pp) both describe exactly this layout; `init_model_parallel` builds the two and
checks that they agree. The layout itself is arithmetic on the config (hrm_mega.config.layout), checked
when the config is loaded, so a bad layout costs one line of error, not a hang.

Model code asks only two questions of this module: how many tensor-parallel ranks there are and
which one this is. With no distributed setup both answers describe a single process, so every model
runs as-is in a notebook or a unit test.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from hrm_mega.config.layout import Layout

_tp_size = 1
_tp_rank = 0


def tp_size() -> int:
    return _tp_size


def tp_rank() -> int:
    return _tp_rank


def set_tensor_parallel(size: int, rank: int) -> None:
    """Records this process's tensor-parallel coordinates (called once megatron-core's groups exist)."""
    global _tp_size, _tp_rank
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside 0..{size - 1}")
    _tp_size, _tp_rank = size, rank


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and, when present, CUDA) identically on every rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main_process() -> bool:
    return global_rank() == 0


# --------------------------------------------------------------------------------------------------
# The 3D layout
# --------------------------------------------------------------------------------------------------


# The layout arithmetic (Layout, resolve_layout, pipeline_stage_blocks) is hrm_mega.config.layout's.


# --------------------------------------------------------------------------------------------------
# Process groups
# --------------------------------------------------------------------------------------------------

_layout: Layout | None = None
_topology: Any = None


def init_model_parallel(layout: Layout) -> Any:
    """Builds megatron-core's parallel_state and DeepSpeed's topology over the initialised default
    process group, checks that they put this rank at the same coordinates, and records the TP rank
    for the model code. Returns the topology (for a PipelineModule)."""
    global _layout, _topology
    # megatron-core's notes about GPU-only extras and CUDA streams say nothing about a CPU/gloo run
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="When using async grad allreduce")
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            create_gloo_process_groups=False,
        )
    topology = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    rank = torch.distributed.get_rank()
    coord = topology.get_coord(rank)
    ours = layout.coordinates(rank)
    megatron = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    if not ours == (coord.pipe, coord.data, coord.model) == megatron:
        raise RuntimeError(
            f"rank {rank}: layout coordinates disagree (pp, dp, tp): ours {ours}, DeepSpeed "
            f"{(coord.pipe, coord.data, coord.model)}, megatron-core {megatron}"
        )
    set_tensor_parallel(layout.tp, ours[2])
    _layout, _topology = layout, topology
    return topology


def pipeline_topology() -> Any:
    """The PipeModelDataParallelTopology built by init_model_parallel (for a PipelineModule)."""
    if _topology is None:
        raise RuntimeError("pipeline_topology() before init_model_parallel()")
    return _topology


def data_parallel_group() -> Any:
    """The process group of this rank's data-parallel replicas (None: the whole world, no model
    parallelism set up)."""
    if _layout is None or _layout.tp * _layout.pp == 1:
        return None
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def tensor_parallel_group() -> Any:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def pipeline_group() -> Any:
    """The process group of this rank's pipeline: one rank per stage, with this rank's dp and tp."""
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


class MegatronMPU:
    """The model-parallel-unit interface DeepSpeed's engine asks (`mpu=`), answered by megatron-core's
    parallel_state. Without pipeline stages, DeepSpeed's "model parallel" is tensor parallel."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.get_model_parallel_rank = ps.get_tensor_model_parallel_rank
        self.get_model_parallel_world_size = ps.get_tensor_model_parallel_world_size
        self.get_model_parallel_group = ps.get_tensor_model_parallel_group
        self.get_tensor_model_parallel_rank = ps.get_tensor_model_parallel_rank
        self.get_tensor_model_parallel_world_size = ps.get_tensor_model_parallel_world_size
        self.get_tensor_model_parallel_group = ps.get_tensor_model_parallel_group
        self.get_tensor_model_parallel_src_rank = ps.get_tensor_model_parallel_src_rank
        self.get_data_parallel_rank = ps.get_data_parallel_rank
        self.get_data_parallel_world_size = ps.get_data_parallel_world_size
        self.get_data_parallel_group = ps.get_data_parallel_group


# --------------------------------------------------------------------------------------------------
# Collectives for metrics and decisions
# --------------------------------------------------------------------------------------------------


def all_reduce(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum over the data-parallel replicas, or over `group` (a copy; the input is left alone). Metrics
    sum over DP only: the tensor-parallel ranks of a replica hold the same values. NCCL reduces on the
    GPU, so CPU tensors make a round trip there."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        group = data_parallel_group() if group is None else group
        device = t.device
        t = t.to("cuda", copy=True) if torch.distributed.get_backend() == "nccl" else t.clone()
        torch.distributed.all_reduce(t, group=group)
        t = t.to(device)
    return t


def all_reduce_sums(sums: dict[str, float], group: Any = None) -> dict[str, float]:
    """The same keys, each summed over the data-parallel replicas (or `group`), in one collective: every
    rank must pass the same keys in the same order."""
    total = all_reduce(torch.tensor([float(v) for v in sums.values()], dtype=torch.float64), group)
    return dict(zip(sums, total.tolist()))


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank. Decided together: a backward pass on some ranks
    only would hang the others."""
    flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=loss.device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag[0] == 1)
