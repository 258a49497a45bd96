"""DeepSpeed set-up from the typed config: process group, engine config, `deepspeed.initialize`.

On a machine without GPUs the accelerator is DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`) and
the backend is gloo; on GPUs it is NCCL. A process started without a launcher is a world of one.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch

from hrm_mega.config import Config, ConfigError


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(config: Config) -> World:
    """Initialises torch.distributed (through DeepSpeed) and checks the layout against the world size."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # started without a launcher: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world_size = int(os.environ["WORLD_SIZE"])
    par = config.parallel
    if world_size % (par.tp * par.pp):
        raise ConfigError(
            f"world size {world_size} is not a multiple of parallel.tp x parallel.pp = {par.tp} x {par.pp}"
        )
    import deepspeed

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=par.timeout_minutes)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
    rank, local_rank = torch.distributed.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if par.tp > 1:
        raise ConfigError("parallel.tp > 1 is not wired into the trainer yet; use parallel.tp=1")
    dp = world_size // (par.tp * par.pp)
    # Rank order: tensor-parallel fastest, then data-parallel, then pipeline stages.
    return World(rank, world_size, local_rank, (rank // par.tp) % dp, dp, device)


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
    micro = train.micro_batch or local_batch
    if local_batch % micro:
        raise ConfigError(f"train.micro_batch={micro} does not divide the per-rank batch {local_batch}")
    if train.precision == "bf16" and not bf16_supported():
        raise ConfigError("train.precision=bf16 is not supported by this GPU; use train.precision=fp32")
    ds: dict[str, Any] = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": local_batch // micro,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": {"stage": par.zero_stage},
        "zero_allow_untested_optimizer": True,  # client optimizers (AdamATan2) are plain torch optimizers
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """`deepspeed.initialize` with a client optimizer; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
