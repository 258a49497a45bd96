"""DeepSpeed set-up from the typed config: process group, engine config, `deepspeed.initialize`.

On a machine without GPUs the accelerator is DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`) and
the backend is gloo; on GPUs it is NCCL. A process started without a launcher is a world of one.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hrm_mega.config import Config, ConfigError, Layout, resolve_layout
from hrm_mega.config.run import deep_merge
from hrm_mega.distributed import MegatronMPU, all_reduce, init_model_parallel
from hrm_mega.launch.srun import adopt_srun_environment


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device
    tp_rank: int = 0
    pp_rank: int = 0
    layout: Layout | None = None

    @property
    def model_parallel(self) -> bool:
        return self.layout is not None and self.layout.tp * self.layout.pp > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(config: Config) -> World:
    """Checks the layout against the world size (before any process-group work), then initialises
    torch.distributed (through DeepSpeed) and, with tp or pp > 1, the model-parallel groups."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    adopt_srun_environment()  # one srun task per rank
    if "RANK" not in os.environ:  # started without a launcher: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    layout = resolve_layout(config, int(os.environ["WORLD_SIZE"]))
    par = config.parallel
    _one_extension_build_per_environment()
    import deepspeed

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=par.timeout_minutes)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
    rank, local_rank = torch.distributed.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if layout.tp * layout.pp > 1:
        init_model_parallel(layout)
    pp_rank, dp_rank, tp_rank = layout.coordinates(rank)
    return World(rank, layout.world_size, local_rank, dp_rank, layout.dp, device, tp_rank, pp_rank, layout)


def shutdown_distributed() -> None:
    """Destroys the process groups and lets gloo's worker threads finish before the interpreter shuts
    down. A gloo thread frees a collective's tensors only after waking the caller, and that needs the
    GIL; a thread still waiting for it when interpreter shutdown begins aborts the process (SIGABRT,
    "terminate called without an active exception") after a successful run. The pause releases the
    GIL to them. Only where every rank arrives (the end of a run, a preemption stop): destroying the
    groups while a peer is still inside a collective can hang, so a rank that failed leaves them."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        time.sleep(0.5)


def _one_extension_build_per_environment() -> None:
    """DeepSpeed JIT-builds its CPU communication op into TORCH_EXTENSIONS_DIR and rebuilds it (minutes)
    whenever the build command changes: with another ninja on PATH (the venv's and the system's hash
    commands differently), or after another environment built into the shared cache. So the
    environment's own ninja goes first on PATH and each Python environment gets its own cache."""
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "ninja").exists():
        os.environ["PATH"] = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    env_id = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    cache = Path.home() / ".cache" / "torch_extensions" / f"hrm-mega-{env_id}"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache))


def collective_failure(error: BaseException, config: Config) -> str | None:
    """One line on a failed collective: another rank, or its host, died (the connection drops at once) or
    stopped answering (after parallel.timeout_minutes). None when `error` is something else. gloo names
    the peer's address; the launcher's summary names the rank."""
    text = str(error).strip()
    if not isinstance(error, torch.distributed.DistError) and "gloo" not in text:
        return None
    reason = text.splitlines()[0] if text else type(error).__name__
    reason = re.sub(r"^\[[^\]]*:\d+\] ", "", reason)  # gloo's source location
    reason = reason.split(". This is typically caused")[0]
    return (
        f"a collective failed ({reason}): another rank or its host died or stopped answering "
        f"(parallel.timeout_minutes={config.parallel.timeout_minutes:g}); the launcher's summary names the rank"
    )


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True  # CPU bf16 matmuls run everywhere (fast with AMX/AVX512-BF16)


def deepspeed_config(config: Config, world: World, local_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run. Batch sizes are in samples (rows) per optimizer step."""
    train, par = config.train, config.parallel
    micro = train.micro_batch or local_batch  # it divides local_batch (checked by load_config)
    if train.precision == "bf16" and not bf16_supported():
        raise ConfigError("train.precision=bf16 is not supported by this GPU; use train.precision=fp32")
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": local_batch // micro,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {
            "stage": par.zero_stage,
            **zero_buckets(config.model.hidden_size),
            **ZERO_REDUCE,
        },
        "zero_allow_untested_optimizer": True,  # client optimizers (AdamATan2) are plain torch optimizers
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if par.pp > 1:
        # Stage boundaries carry (hidden, ids, mask, halting sums): DeepSpeed's splitting of the first
        # activation over TP ranks assumes one differentiable tensor, so it stays off.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if par.pp > 1 and par.zero_stage == 0:
        # DeepSpeed's fp32 pipeline path clips without reporting the norm; the pipeline trainer clips
        # in its optimizer-step hook instead (training/tasks/lm.py, StepGuard).
        ds["gradient_clipping"] = 0.0
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return deep_merge(ds, par.deepspeed)  # parallel.deepspeed: checked to set none of the keys above


# ZeRO-1/2 reduce each gradient slice to the rank that owns its partition, not to every rank: DeepSpeed's
# default (use_multi_rank_bucket_allreduce) all-reduces whole buckets, so every rank receives all P
# gradient bytes and keeps 1/dp of them. Reduced to their owners, a rank sends (dp-1)/dp x P, the
# reduce-scatter volume (bench/parallel_overhead.py measures it; docs/parallelism.md).
ZERO_REDUCE = {"use_multi_rank_bucket_allreduce": False}


def zero_buckets(hidden: int) -> dict[str, int]:
    """ZeRO communication buckets (elements) that scale with the model: the "auto" values of the Hugging
    Face DeepSpeed integration. DeepSpeed's defaults (5e8 elements) hold a 2 GB fp32 reduce buffer per rank
    under ZeRO-3 whatever the model size (bench/zero_memory.py --default-buckets)."""
    return {
        "reduce_bucket_size": hidden * hidden,
        "allgather_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }


def initialize(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any], world: World
):
    """`deepspeed.initialize` with a client optimizer; returns the engine. Under tensor parallelism
    DeepSpeed gets megatron-core's groups (`mpu`): gradients average over the data-parallel group, and
    the gradient norm counts split parameters on every TP rank and replicated ones once."""
    import deepspeed

    # With pipeline stages DeepSpeed takes its groups from the PipelineModule's topology (GPT-NeoX's
    # pattern: mpu=None); its "model parallel" axis there is the tensor-parallel one.
    layout = world.layout
    mpu = MegatronMPU() if layout is not None and layout.tp > 1 and layout.pp == 1 else None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    return engine


def grad_norm(params: Iterable[torch.nn.Parameter], world: World) -> float:
    """Global L2 norm of the gradients in .grad, already averaged over data-parallel replicas: split
    tensor-parallel parameters count on every TP rank, replicated ones once, a pipeline's second copy of
    the tied embedding (ds_pipe_replicated) not at all, every pipeline stage's parameters once."""
    square = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if getattr(p, "tensor_model_parallel", False) or world.tp_rank == 0:
            square += p.grad.detach().double().square().sum().cpu()
    if world.model_parallel:  # every replica adds the same gradients
        square = all_reduce(square, group=torch.distributed.group.WORLD) / world.dp_size
    return float(square.sqrt())


def client_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The optimizer the run built (AdamATan2, AdamW), inside DeepSpeed's ZeRO wrapper if there is one."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)
