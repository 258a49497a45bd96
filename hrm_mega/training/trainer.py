"""What every training task shares: the DeepSpeed engine, LR schedule, EMA, the non-finite guard,
checkpoints with exact resume, logging, and the loop itself.

A task (training/puzzle.py: ACT segments; training/lm.py: next-token prediction) subclasses Trainer and
supplies its data stream, one optimizer step (`train_step`), its evaluation, and whatever extra state
its checkpoints must carry. `build_trainer` picks the task from the config.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from hrm_mega.checkpoint.atomic import CheckpointManager, read_client_state, resolve_resume, tag_for
from hrm_mega.checkpoint.model_dir import CheckpointError
from hrm_mega.checkpoint.universal import UNIVERSAL, load_universal, save_universal
from hrm_mega.config import Config, ConfigError, save_resolved
from hrm_mega.data.shards import read_manifest
from hrm_mega.data.stream import PuzzleStream, iterate_split
from hrm_mega.distributed import data_parallel_group, seed_everything, tensor_parallel_group
from hrm_mega.models import build_model
from hrm_mega.optim import EMA, AdamATan2, lr_at
from hrm_mega.training import engine as ds
from hrm_mega.training.metrics import MetricsLogger, Throughput


class TrainingError(ValueError):
    """Training cannot continue (e.g. repeated non-finite losses); the message is one line."""


# EX_TEMPFAIL (sysexits.h): the run stopped early on SIGTERM with a complete checkpoint; run the same
# command again (--resume auto) to continue. Distinct from 0 (finished) and from failures.
PREEMPTED_EXIT_CODE = 75


class Preempted(SystemExit):
    """Raised by Trainer.train once the checkpoint after a SIGTERM is written. A SystemExit, so that every
    entry point exits with PREEMPTED_EXIT_CODE and no `except Exception` swallows it."""


class SigtermFlag:
    """SIGTERM becomes a request to stop after the current step. Ranks get the signal at different
    moments (or only some of them get it), so the decision is collective: on_any_rank() all-reduces the
    flag after every step, and all ranks stop after the same one."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

    @classmethod
    def install(cls) -> SigtermFlag:
        flag = cls()
        if threading.current_thread() is threading.main_thread():  # Python runs handlers only there
            flag._previous = signal.signal(signal.SIGTERM, flag._handle)
            flag._installed = True
        return flag

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def on_any_rank(self, device: torch.device | str = "cpu") -> bool:
        """Collective. `device`: where the backend reduces (the rank's GPU under NCCL)."""
        received = torch.tensor([float(self.received)], device=device)
        return bool(all_reduce(received, group=torch.distributed.group.WORLD)[0] > 0)


class Trainer(ABC):
    config: Config
    run_dir: Path
    world: ds.World
    model: torch.nn.Module
    engine: Any
    stream: PuzzleStream
    ema: EMA | None
    checkpoints: CheckpointManager
    logger: MetricsLogger
    step: int = 0
    nonfinite_in_a_row: int = 0
    command: str = "train"  # the hrm-mega command the summary names

    def __init__(self, config: Config, resume: str | None = "auto") -> None:
        self.config = config
        self.run_dir = Path(config.log.out_dir)
        self.world = ds.setup_distributed(config)
        self.manifest = self.check_data()
        seed_everything(config.train.seed)
        self.model = self.build_model()
        self.local_batch = config.train.global_batch // self.world.dp_size
        self.engine = ds.initialize(
            self.model,
            self.build_optimizer(),
            ds.deepspeed_config(config, self.world, self.local_batch),
            self.world,
        )
        self.after_engine()
        self.ema = EMA(self.model, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
        self.stream = self.build_stream()
        self.checkpoints = CheckpointManager(self.run_dir, self.world.rank, config.train.keep_checkpoints)
        start = resolve_resume(resume, self.checkpoints)
        if start is not None:
            self.load_checkpoint(start)
        if self.world.rank == 0:
            save_resolved(config, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(config, self.run_dir, self.world.rank, config.train.steps, self.step)
        self.logger.print(self.summary(start))

    # --- what a task provides --------------------------------------------------------------------

    def manifest_fields(self) -> tuple[str, ...]:
        """Fields of manifest.json that must equal the model config's fields of the same name (the
        model's vocab_size may exceed the data's: padded, e.g. to a multiple of parallel.tp)."""
        return ("seq_len",)

    def after_engine(self) -> None:
        """Set-up that needs the engine (e.g. optimizers living outside it)."""
        return None

    @abstractmethod
    def build_stream(self) -> PuzzleStream:
        """The training stream (partitioned, deterministic given the seed, resumable)."""

    @abstractmethod
    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns global metrics for logging."""

    @abstractmethod
    def evaluate_all(self) -> dict[str, float]:
        """Every evaluation of the task, keyed for metrics.jsonl."""

    @abstractmethod
    def step_counts(self) -> tuple[int, int]:
        """(samples, tokens) consumed by the last step, for samples/s and tokens/s."""

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Task state for checkpoints: (JSON-able client state, tensors)."""
        return {}, {}

    def load_extra_state(self, client: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restores what extra_state saved."""
        return None

    def summary_lines(self) -> list[str]:
        return []

    # --- builders --------------------------------------------------------------------------------

    def check_data(self) -> dict[str, Any]:
        c, d = self.config.model, self.config.data
        if not d.path:
            raise ConfigError(
                "data.path is empty; build a dataset with `hrm-mega prep ...` and point data.path at it"
            )
        manifest = read_manifest(d.path)
        if manifest["vocab_size"] > c.vocab_size:
            raise ConfigError(
                f"model.vocab_size={c.vocab_size} is smaller than {d.path}/manifest.json's vocab_size "
                f"{manifest['vocab_size']}"
            )
        for name in self.manifest_fields():
            if manifest[name] != getattr(c, name):
                raise ConfigError(
                    f"model.{name}={getattr(c, name)} but {d.path}/manifest.json has {name}={manifest[name]}"
                )
        if self.config.optim.ema_decay > 0 and self.config.parallel.zero_stage == 3:
            raise ConfigError(
                "optim.ema_decay > 0 is not supported with parallel.zero_stage=3; use stage 0-2"
            )
        return manifest

    def build_model(self) -> torch.nn.Module:
        """The model on this rank's device: initialised from the seed, or from train.init_from."""
        config = self.config
        model = build_model(config.model).init_weights(config.train.seed).to(self.world.device)
        if config.train.init_from:
            load_init_weights(model, config)
        if config.train.compile:
            model.compile()  # in place: parameter names, and so checkpoints, are unchanged
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        return AdamATan2(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)

    # --- the update ------------------------------------------------------------------------------

    def lr_scale(self) -> float:
        o, t = self.config.optim, self.config.train
        warmup = min(o.warmup_steps, t.steps - 1)
        return lr_at(
            self.step, base_lr=1.0, warmup_steps=warmup, total_steps=t.steps, min_ratio=o.lr_min_ratio
        )

    def set_lr(self) -> float:
        lr = self.config.optim.lr * self.lr_scale()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def start_micro_batch(self, index: int, count: int) -> None:
        """Before micro-batch `index` of `count` in a step that calls engine.step() once. DeepSpeed would
        count one micro-step per engine.step() and step the optimizer only every count-th trainer step;
        the explicit boundary makes the last micro-batch the one that reduces gradients and steps."""
        self.engine.set_gradient_accumulation_boundary(index == count - 1)

    def apply_update(self, all_finite: bool) -> float:
        """After backward on every micro-batch: the optimizer step and EMA, or, when any rank saw a
        non-finite loss, a skipped step (aborting after train.max_nonfinite_steps in a row).
        Returns the pre-clipping gradient norm (nan when skipped)."""
        if not all_finite:
            self.engine.zero_grad()
            self.count_skipped_step()
            return float("nan")
        grad_norm = self._grad_norm_before_step()
        self.engine.step()
        if math.isnan(grad_norm):
            grad_norm = float(self.engine.get_global_grad_norm())
        self.after_optimizer_step()
        self.after_update()
        return grad_norm

    def count_skipped_step(self) -> None:
        """A step skipped for a non-finite loss; aborts after train.max_nonfinite_steps in a row."""
        self.nonfinite_in_a_row += 1
        limit = self.config.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise TrainingError(
                f"step {self.step}: non-finite loss in {self.nonfinite_in_a_row} consecutive steps "
                f"(train.max_nonfinite_steps={limit}); lower optim.lr or check the data"
            )

    def after_update(self) -> None:
        """After an applied optimizer step: EMA, and the non-finite streak ends."""
        if self.ema is not None:
            self.ema.update(self.model)
        self.nonfinite_in_a_row = 0

    def after_optimizer_step(self) -> None:
        """Updates outside the engine that happen with every optimizer step (e.g. sparse embeddings)."""
        return None

    def _grad_norm_before_step(self) -> float:
        """Global L2 norm of the DP-averaged gradients before clipping. ZeRO optimizers compute it in
        their step (read it from the engine afterwards); without ZeRO the gradients sit in .grad. Under
        tensor parallelism split parameters add up over the TP group; replicated ones count once."""
        if self.config.parallel.zero_stage > 0:
            return float("nan")
        split = replicated = torch.zeros((), dtype=torch.float64)
        for p in self.model.parameters():
            if p.grad is not None:
                square = p.grad.detach().double().square().sum().cpu()
                if getattr(p, "tensor_model_parallel", False):
                    split = split + square
                else:
                    replicated = replicated + square
        if self.world.model_parallel:
            split = all_reduce(split, group=tensor_parallel_group())
        return float((split + replicated).sqrt())

    # --- the loop --------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Runs to train.steps; on SIGTERM it stops after the current step instead (stop_preempted)."""
        cfg = self.config
        interval = cfg.train.checkpoint_interval
        rate = Throughput()
        final_eval: dict[str, float] = {}
        sigterm = SigtermFlag.install()
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                rate.add(*self.step_counts())
                self.logger.advance()
                if self.step % cfg.log.log_interval == 0 or self.step == cfg.train.steps:
                    progress = reduce_progress(self.stream.progress, self.world.dp_size)
                    self.logger.log(self.step, {**metrics, **rate.rates(), **progress})
                if (
                    cfg.train.eval_interval
                    and self.step % cfg.train.eval_interval == 0
                    and self.step < cfg.train.steps
                ):
                    self.log_evaluation()
                saved = bool(interval) and self.step % interval == 0
                if saved:
                    self.save_checkpoint()
                if sigterm.on_any_rank(self.world.device):
                    self.stop_preempted(saved)
            final_eval = self.log_evaluation()
            if not interval or self.step % interval:
                self.save_checkpoint()
        except RuntimeError as e:
            if (failure := ds.collective_failure(e, cfg)) is None:
                raise
            raise TrainingError(f"after step {self.step}: {failure}") from None
        finally:
            sigterm.uninstall()
            self.logger.close()
            self.stream.close()
        return final_eval

    def stop_preempted(self, saved: bool) -> NoReturn:
        """After SIGTERM (Slurm preemption or time limit, a launcher shutting down): every rank is here
        after the same step. Writes a complete checkpoint (unless this step's was just written) and exits
        the process with PREEMPTED_EXIT_CODE; `--resume auto` continues exactly from it."""
        path = self.checkpoints.root / tag_for(self.step) if saved else self.save_checkpoint()
        self.logger.print(
            f"preempted: SIGTERM received, stopped after step {self.step} with a complete checkpoint {path}; "
            f"exit code {PREEMPTED_EXIT_CODE}, resume with --resume auto"
        )
        raise Preempted(PREEMPTED_EXIT_CODE)

    def log_evaluation(self) -> dict[str, float]:
        results = self.evaluate_all()
        self.logger.log(self.step, results)
        self.logger.print(f"step {self.step} eval: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results

    # --- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        extra_client, extra_tensors = self.extra_state()
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state(), **extra_tensors}
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict()["shadow"].items()}
        client = {
            "step": self.step,
            "stream": self.stream.state_dict(),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "world_size": self.world.world_size,
            "config": self.config.to_dict(),
            **extra_client,
        }

        def write_universal(directory: Path) -> None:
            w = self.world
            save_universal(
                directory, self.model, client_optimizer(self.engine), (w.pp_rank, w.dp_rank, w.tp_rank),
                self.ema.shadow if self.ema is not None else None,
            )  # fmt: skip

        path = self.checkpoints.save(self.engine, self.step, client, tensors, write_universal)
        self.logger.print(f"saved checkpoint {path}")
        return path

    # A task whose checkpoints hold per-replica state (the puzzle task's ACT rows in flight) cannot
    # resume at another data-parallel size.
    reshards_data_parallel: bool = True

    def load_checkpoint(self, path: Path) -> None:
        """Resumes from `path`: with DeepSpeed's own files when the layout (ranks, tp, pp, ZeRO stage) is
        the saved one, from the layout-free copy (checkpoint/universal.py) otherwise."""
        first, _ = read_client_state(path, 0)
        for key, value in first["config"]["model"].items():
            if getattr(self.config.model, key) != value:
                raise ConfigError(
                    f"model.{key}={getattr(self.config.model, key)!r} differs from the checkpoint's {value!r} ({path})"
                )
        saved = first["config"]["parallel"]
        par = self.config.parallel
        same_layout = first["world_size"] == self.world.world_size and all(
            saved[k] == getattr(par, k) for k in ("tp", "pp", "zero_stage")
        )
        if same_layout:
            client, tensors = self.checkpoints.load(self.engine, path)
            if self.ema is not None:
                shadow = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
                self.ema.load_state_dict({"decay": self.config.optim.ema_decay, "shadow": shadow})
        else:
            client, tensors = self._load_other_layout(path, first)
        self.step = client["step"]
        self.nonfinite_in_a_row = client["nonfinite_in_a_row"]
        self.stream.load_state_dict(client["stream"])
        torch.set_rng_state(tensors["rng.torch"])
        self.load_extra_state(client, tensors)

    def _load_other_layout(
        self, path: Path, first: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        saved, world = first["config"]["parallel"], first["world_size"]
        saved_dp = world // (saved["tp"] * saved["pp"])
        described = (
            f"{world} ranks (tp {saved['tp']} x pp {saved['pp']} x dp {saved_dp}, ZeRO {saved['zero_stage']})"
        )
        universal = path / UNIVERSAL
        if not universal.is_dir():
            raise CheckpointError(
                f"{path} was saved with {described} and has no {UNIVERSAL}/ copy; resume it with that layout"
            )
        if saved_dp != self.world.dp_size and not self.reshards_data_parallel:
            raise ConfigError(
                f"{path} was saved with {described}; the {self.config.task} task keeps per-replica state, so "
                f"resume it at dp {saved_dp} (tp and pp may change)"
            )
        load_universal(
            universal, self.model, client_optimizer(self.engine), (self.config.parallel.tp, self.world.tp_rank),
            self.ema.shadow if self.ema is not None else None,
        )  # fmt: skip
        if saved_dp == self.world.dp_size:  # the same replica's state (pipeline stage 0, TP rank 0)
            return read_client_state(path, self.world.dp_rank * saved["tp"])
        streams = [read_client_state(path, r)[0]["stream"] for r in range(0, world, saved["tp"])]
        _, tensors = read_client_state(path, 0)
        return {**first, "stream": PuzzleStream.merge_state_dicts(streams)}, tensors

    def summary(self, resumed_from: Path | None) -> str:
        c, w = self.config, self.world
        n = sum(p.numel() for p in self.model.parameters())
        split = self.manifest["splits"][c.data.train_split]
        lines = [
            f"hrm-mega {self.command} ({c.task}): {n:,} parameters",
            *self.summary_lines(),
            f"  world {w.world_size} = tp {c.parallel.tp} x pp {c.parallel.pp} x dp {w.dp_size}; "
            f"ZeRO stage {c.parallel.zero_stage}; {c.train.precision}; device {w.device.type}",
            f"  data {c.data.path}: {split['num_samples']:,} train samples in {len(split['shards'])} shards, "
            f"{c.data.partitions} partitions; global batch {c.train.global_batch}",
            f"  run dir {self.run_dir}; "
            + (f"resumed from {resumed_from} at step {self.step}" if resumed_from else "fresh start"),
        ]
        return "\n".join(lines)


def client_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The optimizer the run built (AdamATan2, AdamW), inside DeepSpeed's ZeRO wrapper if there is one."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def load_init_weights(model: torch.nn.Module, config: Config) -> None:
    """Copies the weights of train.init_from into the freshly built model (strictly: every key, every
    shape). A resumed run then overwrites them with its checkpoint."""
    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.checkpoint.model_dir import load_state_dict_strict

    source, source_config = load_model(config.train.init_from)
    if source_config.model.family != config.model.family:
        raise ConfigError(
            f"train.init_from={config.train.init_from} holds a {source_config.model.family} model; "
            f"this recipe is model.family={config.model.family}"
        )
    load_state_dict_strict(model, source.state_dict(), source=f"train.init_from={config.train.init_from}")


def build_trainer(config: Config, resume: str | None = "auto") -> Trainer:
    """The trainer of the config's task."""
    if config.task == "lm" and config.parallel.pp > 1:
        from hrm_mega.training.lm_pipeline import PipelineLMTrainer

        return PipelineLMTrainer(config, resume=resume)
    if config.task == "lm":
        from hrm_mega.training.lm import LMTrainer

        return LMTrainer(config, resume=resume)
    from hrm_mega.training.puzzle import PuzzleTrainer

    return PuzzleTrainer(config, resume=resume)


# --- collectives ---------------------------------------------------------------------------------


def all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank. Decided together: a backward pass on some ranks
    only would hang the others."""
    flag = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=loss.device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag[0] == 1)


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


def reduce_progress(progress: dict[str, float | int], dp_size: int) -> dict[str, float]:
    t = all_reduce(torch.tensor([float(v) for v in progress.values()], dtype=torch.float64))
    out = dict(zip(progress, t.tolist()))
    out["epoch"] = out["epoch"] / dp_size  # each rank's fraction of its own partitions
    return {f"data/{k}": v for k, v in out.items()}


def limit_rows(batches, max_rows: int):
    """Marks rows past the first max_rows (0 = no limit) as not valid, keeping the batch count equal
    across ranks."""
    if not max_rows:
        yield from batches
        return
    seen = 0
    for b in batches:
        if seen >= max_rows:
            b = {**b, "valid": torch.zeros_like(b["valid"])}
        yield b
        seen += b["valid"].shape[0]


def eval_batch_size(config: Config, world: ds.World) -> int:
    return max(1, config.train.global_batch // world.dp_size)


@contextlib.contextmanager
def evaluation(
    model: torch.nn.Module, config: Config, world: ds.World, ema: EMA | None = None
) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
    """Eval mode, and the EMA weights if the run keeps them, for the duration; yields this rank's share
    of the eval split as device batches (rows past train.eval_max_samples marked not valid)."""
    d, t = config.data, config.train
    was_training = model.training
    model.eval()
    try:
        with ema.swapped(model) if ema is not None else contextlib.nullcontext():
            batches = iterate_split(
                d.path, d.eval_split, batch_size=eval_batch_size(config, world), dp_rank=world.dp_rank,
                dp_size=world.dp_size, corrupt_policy=d.corrupt_policy,
            )  # fmt: skip
            batches = limit_rows(batches, t.eval_max_samples // world.dp_size if t.eval_max_samples else 0)
            yield ({k: v.to(world.device) for k, v in b.items()} for b in batches)
    finally:
        model.train(was_training)
