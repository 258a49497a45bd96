"""The one Trainer: the DeepSpeed engine, LR schedule, EMA, the non-finite guard, checkpoints with exact
resume, logging, and the loop itself. It is handed a Task (training/task.py), which supplies the data
stream, one optimizer step, the evaluation and whatever extra state its checkpoints carry;
`build_trainer` picks the task from the config through the task registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, NoReturn

import torch

from hrm_mega.checkpoint.atomic import (
    CheckpointManager,
    pick_intact,
    read_client_state,
    resolve_resume,
    tag_for,
)
from hrm_mega.checkpoint.model_dir import CheckpointError
from hrm_mega.checkpoint.universal import UNIVERSAL, load_universal, save_universal
from hrm_mega.config import Config, ConfigError, DataConfig, save_resolved
from hrm_mega.config.run import changed_fields
from hrm_mega.data.shards import TOKENIZER_FILE, dataset_tokenizer, read_manifest
from hrm_mega.distributed import all_reduce, all_reduce_sums, seed_everything
from hrm_mega.optim import EMA, AdamATan2, lr_at
from hrm_mega.training import engine as ds
from hrm_mega.training.metrics import MetricsLogger, Throughput
from hrm_mega.training.task import Task, build_task


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
        return on_any_rank([self.received], device)[0]


def on_any_rank(flags: list[bool], device: torch.device | str = "cpu") -> list[bool]:
    """Collective: each flag, true when it is true on any rank (one all-reduce for all of them)."""
    values = torch.tensor([float(f) for f in flags], device=device)
    return [bool(v > 0) for v in all_reduce(values, group=torch.distributed.group.WORLD).tolist()]


class Trainer:
    """Runs one Task (training/task.py) at any layout: builds the engine around the task's model, then
    steps, logs, evaluates and checkpoints until train.steps."""

    # configs and the task
    config: Config
    task: Task
    run_dir: Path
    # runtime
    world: ds.World
    manifest: dict[str, Any]
    model: torch.nn.Module
    engine: Any
    stream: Any
    ema: EMA | None
    checkpoints: CheckpointManager
    logger: MetricsLogger
    # state
    step: int = 0
    nonfinite_in_a_row: int = 0

    def __init__(self, config: Config, task: Task, resume: str | None = "auto") -> None:
        # Every check the config and the dataset's manifest allow, before any process group starts
        # (the entry points have run them already; a Trainer built in-process gets them here).
        self.config = config.validate(int(os.environ.get("WORLD_SIZE", "1")), task.command)
        self.task = task
        self.run_dir = Path(config.log.out_dir)
        self.world = ds.setup_distributed(config)
        self.manifest = task.read_data()
        # A text dataset's tokenizer (checked against the manifest) travels in every checkpoint.
        self.tokenizer = dataset_tokenizer(config.data.path, self.manifest)
        # The checkpoint to resume from, checked against this config before any engine starts.
        self.checkpoints = CheckpointManager(self.run_dir, self.world.rank, config.train.keep_checkpoints)
        candidates = resolve_resume(resume, self.checkpoints)
        chosen = pick_intact(candidates, explicit=resume not in (None, "auto", "none"))
        start = chosen.path if chosen is not None else None
        # What changed since the checkpoint (and damaged ones passed over), printed with the summary.
        self.resume_notes: list[str] = [f"  {note}" for note in chosen.notes] if chosen is not None else []
        saved = self.check_resume(start) if start is not None else None
        seed_everything(config.train.seed)
        self.model = task.build_model(self)
        self.local_batch = config.train.global_batch // self.world.dp_size
        ds_config = ds.deepspeed_config(config, self.world, self.local_batch)
        if self.world.rank == 0:  # the DeepSpeed config as the engine got it
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        self.engine = ds.initialize(self.model, self.build_optimizer(), ds_config, self.world)
        task.setup(self)
        self.ema = EMA(self.model, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
        self.stream = task.build_stream(self)
        if chosen is not None and saved is not None:
            self.load_checkpoint(chosen.path, *saved, layout_free=chosen.layout_free)
        if self.world.rank == 0:
            save_resolved(config, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(config, self.run_dir, self.world.rank, config.train.steps, self.step)
        self.logger.print("\n".join([self.summary(start), *self.resume_notes]))

    def build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        params = parameter_groups(self.model, o.gate_lr_mult, o.halt_lr_mult)
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        return AdamATan2(
            params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, a=o.adam_atan2_scale,
            # one compiled kernel per tensor; not on the CPU, where the eager update in cache-sized
            # slices measured faster inside a training step (docs/benchmarks.md, optimizer step)
            compile=self.config.train.compile and self.world.device.type != "cpu",
        )  # fmt: skip

    # --- what a task's step calls ----------------------------------------------------------------

    def set_lr(self) -> float:
        """Sets this step's learning rate (warmup, then cosine to optim.lr_min_ratio); returns it. The
        update about to run is number step + 1, as HRM counts them: the first one is not at LR 0."""
        o, t = self.config.optim, self.config.train
        scale = lr_at(
            self.step + 1, base_lr=1.0, warmup_steps=o.warmup_steps, total_steps=t.steps,
            min_ratio=o.lr_min_ratio,
        )  # fmt: skip
        self.task.set_lr_scale(scale)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = o.lr * scale * group.get("lr_mult", 1.0)
        return o.lr * scale

    def start_micro_batch(self, index: int, count: int) -> None:
        """Before micro-batch `index` of `count` in a step that calls engine.step() once. DeepSpeed would
        count one micro-step per engine.step() and step the optimizer only every count-th trainer step;
        the explicit boundary makes the last micro-batch the one that reduces gradients and steps."""
        self.engine.set_gradient_accumulation_boundary(index == count - 1)

    def apply_update(self, all_finite: bool) -> float:
        """After backward on every micro-batch: the optimizer step and EMA, or, when any rank saw a
        non-finite loss, a skipped step. Returns the pre-clipping gradient norm (nan when skipped)."""
        if not all_finite:
            self.engine.zero_grad()
            self.count_update(applied=False)
            return float("nan")
        # Without ZeRO the DP-averaged gradients sit in .grad before the step; ZeRO computes the norm in
        # its step, so it is read from the engine afterwards.
        zero = self.config.parallel.zero_stage > 0
        grad_norm = float("nan") if zero else ds.grad_norm(self.model.parameters(), self.world)
        self.engine.step()
        if zero:
            grad_norm = float(self.engine.get_global_grad_norm())
        self.task.after_optimizer_step()
        self.count_update(applied=True)
        return grad_norm

    def count_update(self, applied: bool) -> None:
        """After an optimizer step the engine applied (EMA follows; the non-finite streak ends) or skipped
        for a non-finite loss (aborting after train.max_nonfinite_steps in a row)."""
        if applied:
            if self.ema is not None:
                self.ema.update(self.model)
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        limit = self.config.train.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise TrainingError(
                f"step {self.step}: non-finite loss in {self.nonfinite_in_a_row} consecutive steps "
                f"(train.max_nonfinite_steps={limit}); lower optim.lr or check the data"
            )

    # --- the loop --------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step of the task; returns its global metrics."""
        metrics = self.task.train_step(self)
        self.step += 1
        return metrics

    def evaluate(self) -> dict[str, float]:
        return self.task.evaluate(self)

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
                rate.add(*self.task.step_counts())
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
                preempted, ran_out = on_any_rank(
                    [sigterm.received, getattr(self.stream, "ran_out", False)], self.world.device
                )
                if preempted:
                    self.stop_preempted(saved)
                if ran_out:
                    self.logger.print(
                        f"data.source_end=stop: a source has been read to its end; stopping after step {self.step}"
                    )
                    break
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
        ds.shutdown_distributed()
        raise Preempted(PREEMPTED_EXIT_CODE)

    def log_evaluation(self) -> dict[str, float]:
        results = self.evaluate()
        self.logger.log(self.step, results)
        self.logger.print(f"step {self.step} eval: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results

    # --- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        extra_client, extra_tensors = self.task.state()
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state(), **extra_tensors}
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict()["shadow"].items()}
        client = {
            "step": self.step,
            "stream": self.stream.state_dict(),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "world_size": self.world.world_size,
            "config": self.config.to_dict(),
            "data_fingerprint": data_fingerprint(self.config.data, self.manifest),
            **extra_client,
        }

        def write_universal(directory: Path) -> None:
            w = self.world
            save_universal(
                directory, self.model, ds.client_optimizer(self.engine), (w.pp_rank, w.dp_rank, w.tp_rank),
                self.ema.shadow if self.ema is not None else None,
            )  # fmt: skip

        files = {TOKENIZER_FILE: self.tokenizer} if self.tokenizer is not None else {}
        path = self.checkpoints.save(self.engine, self.step, client, tensors, write_universal, files)
        self.logger.print(f"saved checkpoint {path}")
        return path

    def check_resume(self, path: Path) -> tuple[dict[str, Any], bool]:
        """The checkpoint's rank-0 client state, after checking that its model is this config's, noting
        every other field that changed, and refusing other training data unless train.allow_data_change.
        The bool is False when the data changed (and that is allowed): the stream then starts at the new
        data's beginning."""
        first, _ = read_client_state(path, 0)
        model = self.config.to_dict()["model"]  # nested sections (model.vision) as the saved dicts are
        for key, value in first["config"]["model"].items():
            if model.get(key) != value:
                raise ConfigError(
                    f"model.{key}={getattr(self.config.model, key)!r} differs from the checkpoint's {value!r} ({path})"
                )
        changes = [
            c
            for c in changed_fields(first["config"], self.config.to_dict())
            if c[0] != "train.allow_data_change"
        ]
        saved_print = first.get("data_fingerprint")  # absent in checkpoints from before it was recorded
        same_shards = saved_print == data_fingerprint(self.config.data, self.manifest)
        reasons = [f"{name} {old!r} -> {new!r}" for name, old, new in changes if name in DATA_ORDER_FIELDS]
        if same_shards and len(reasons) == 1 and reasons[0].startswith("data.path "):
            reasons = []  # the same shards, moved
        if saved_print is not None and not same_shards:
            reasons.insert(0, "the train shards under data.path differ from the checkpoint's")
        if reasons and not self.config.train.allow_data_change:
            raise ConfigError(
                f"resuming {path} on other training data ({'; '.join(reasons)}): its saved position does not "
                "apply; resume with the checkpoint's data, or set train.allow_data_change=true to read the new "
                "data from its start"
            )
        if changes:
            listed = "; ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)
            self.resume_notes.append(f"  changed since the checkpoint: {listed}")
        if reasons:
            self.resume_notes.append("  train.allow_data_change=true: the new data is read from its start")
        return first, not reasons

    def load_checkpoint(
        self, path: Path, first: dict[str, Any], same_data: bool, layout_free: bool = False
    ) -> None:
        """Resumes from `path`: with DeepSpeed's own files when the layout (ranks, tp, pp, ZeRO stage) is
        the saved one, from the layout-free copy (checkpoint/universal.py) otherwise."""
        saved = first["config"]["parallel"]
        par = self.config.parallel
        same_layout = (
            not layout_free
            and first["world_size"] == self.world.world_size
            and all(saved[k] == getattr(par, k) for k in ("tp", "pp", "zero_stage"))
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
        if same_data:
            self.stream.load_state_dict(client["stream"])
        torch.set_rng_state(tensors["rng.torch"])
        self.task.load_state(self, client, tensors)

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
        if saved_dp != self.world.dp_size and not self.task.reshards_data_parallel:
            raise ConfigError(
                f"{path} was saved with {described}; the {self.config.task} task keeps per-replica state, so "
                f"resume it at dp {saved_dp} (tp and pp may change)"
            )
        load_universal(
            universal, self.model, ds.client_optimizer(self.engine), (self.config.parallel.tp, self.world.tp_rank),
            self.ema.shadow if self.ema is not None else None, zero_optimizer=self.engine.optimizer,
        )  # fmt: skip
        if saved_dp == self.world.dp_size:  # the same replica's state (pipeline stage 0, TP rank 0)
            return read_client_state(path, self.world.dp_rank * saved["tp"])
        streams = [read_client_state(path, r)[0]["stream"] for r in range(0, world, saved["tp"])]
        _, tensors = read_client_state(path, 0)
        return {**first, "stream": type(self.stream).merge_state_dicts(streams)}, tensors

    def summary(self, resumed_from: Path | None) -> str:
        c, w = self.config, self.world
        n = sum(p.numel() for p in self.model.parameters())
        split = self.manifest["splits"][c.data.train_split]
        lines = [
            f"hrm-mega {self.task.command} ({c.task}): {n:,} parameters",
            *self.task.summary_lines(self),
            f"  world {w.world_size} = tp {c.parallel.tp} x pp {c.parallel.pp} x dp {w.dp_size}; "
            f"ZeRO stage {c.parallel.zero_stage}; {c.train.precision}; device {w.device.type}",
            f"  data {c.data.path}: {split['num_samples']:,} train samples in {len(split['shards'])} shards, "
            f"{c.data.partitions} partitions; global batch {c.train.global_batch}",
            f"  run dir {self.run_dir}; "
            + (f"resumed from {resumed_from} at step {self.step}" if resumed_from else "fresh start"),
        ]
        o = c.optim
        if o.warmup_steps >= c.train.steps > self.step:
            lines.append(
                f"  note: optim.warmup_steps={o.warmup_steps} >= train.steps={c.train.steps}: the learning rate "
                f"never reaches optim.lr={o.lr:g}"
            )
        return "\n".join(lines)


GATE_PARAMS = ("gate_LL", "gate_LH", "gate_HH")
HALT_PARAMS = ("halt_head", "q_head", "cell_head")  # HRMGemma; the puzzle model (q_head: first / cells)


def parameter_groups(
    model: torch.nn.Module, gate_lr_mult: float = 1.0, halt_lr_mult: float = 1.0
) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """The trainable parameters for the optimizer: one plain list when every multiplier is 1 (so runs
    without them keep their optimizer state layout), else groups with an `lr_mult` that set_lr applies:
    the injection gates (optim.gate_lr_mult), the halting heads (optim.halt_lr_mult), the rest."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if gate_lr_mult == 1.0 and halt_lr_mult == 1.0:
        return [p for _, p in named]
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        parts = name.split(".")
        mult = 1.0
        if parts[-1] in GATE_PARAMS:
            mult = gate_lr_mult
        elif any(h in parts for h in HALT_PARAMS):
            mult = halt_lr_mult
        groups.setdefault(mult, []).append(p)
    return [{"params": ps, "lr_mult": mult} for mult, ps in sorted(groups.items())]


def build_trainer(config: Config, resume: str | None = "auto", rl: bool = False) -> Trainer:
    """The Trainer running the config's task (or RL post-training around it)."""
    task = build_task(config, rl=rl)
    return Trainer(task.config, task, resume=resume)


def reduce_progress(progress: dict[str, float | int], dp_size: int) -> dict[str, float]:
    out = all_reduce_sums(dict(progress))
    for key in [k for k in out if k.split("/")[-1] == "epoch"]:
        out[key] = out[key] / dp_size  # each rank's fraction of its own partitions
    return {f"data/{k}": v for k, v in out.items()}


# The data fields that decide which samples a step reads, and in what order: a resume keeps the stream's
# saved position only when they (and the train shards) are the checkpoint's.
DATA_ORDER_FIELDS = (
    "data.path",
    "data.sources",
    "data.train_split",
    "data.partitions",
    "data.shuffle_buffer",
    "data.augment",
)


def data_fingerprint(data: DataConfig, manifest: dict[str, Any]) -> str:
    """The identity of the train split's shards (names, sample counts and sha256 from the manifest): of
    data.path, or of every source of a mixture."""
    manifests = [read_manifest(s.path) for s in data.sources] if data.sources else [manifest]
    shards = [m.get("splits", {}).get(data.train_split, {}).get("shards", []) for m in manifests]
    return hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()
