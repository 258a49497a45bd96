"""The ACT pretraining loop for the puzzle family, on DeepSpeed.

One optimizer step is one ACT segment for every row of the global batch (deep supervision):

    halted rows take new samples from the stream       (refill: nothing is dropped)
    loss = act_loss(engine(carry, batch))              (+ a no-grad look-ahead for bootstrap Q targets)
    engine.backward(loss); engine.step()               (AdamATan2 under ZeRO, clipping, accumulation)
    sign_sgd.step(puzzle ids, their gradients)         (the embedding table lives outside ZeRO)
    ema.update(model)

The ACT controller (carry, step counts, current rows) lives here, outside the engine. Everything that
decides the run is keyed by seed and sample, so the same seed gives the same losses at any DP size,
and a resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hrm_mega.config import Config, ConfigError, save_resolved
from hrm_mega.data.shards import read_manifest
from hrm_mega.data.stream import PuzzleStream, iterate_split
from hrm_mega.distributed import seed_everything
from hrm_mega.inference.puzzle import metric_sums, metrics_from_sums, run_adaptive, run_fixed
from hrm_mega.models.act import ACTState, initial_state, refill, step_segment
from hrm_mega.models.puzzle import RecursiveReasoner, count_parameters
from hrm_mega.models.recurrence import Carry
from hrm_mega.optim import EMA, AdamATan2, SparseSignSGD, lr_at
from hrm_mega.training import engine as ds
from hrm_mega.training.checkpoint import CheckpointManager, resolve_resume
from hrm_mega.training.metrics import MetricsLogger, Throughput

METRIC_KEYS = ("count", "token_accuracy", "exact_accuracy", "q_halt_accuracy", "steps")
LOSS_KEYS = ("lm_loss", "q_halt_loss", "q_continue_loss")


class TrainingError(ValueError):
    """Training cannot continue (e.g. repeated non-finite losses); the message is one line."""


class PuzzleTrainer:
    # configs
    config: Config
    run_dir: Path
    # runtime
    world: ds.World
    model: RecursiveReasoner
    engine: Any
    stream: PuzzleStream
    sign_sgd: SparseSignSGD
    ema: EMA | None
    checkpoints: CheckpointManager
    logger: MetricsLogger
    # state
    step: int = 0
    act: ACTState | None = None
    nonfinite_in_a_row: int = 0

    def __init__(self, config: Config, resume: str | None = "auto") -> None:
        self.config = config
        self.run_dir = Path(config.log.out_dir)
        self.world = ds.setup_distributed(config)
        self.manifest = self._check_data()
        seed_everything(config.train.seed)
        self.model = RecursiveReasoner(config.model).init_weights(config.train.seed).to(self.world.device)
        if config.train.compile:
            self.model.compile()  # in place: parameter names, and so checkpoints, are unchanged
        self.local_batch = config.train.global_batch // self.world.dp_size
        optimizer = self.build_optimizer()
        self.engine = ds.initialize(
            self.model, optimizer, ds.deepspeed_config(config, self.world, self.local_batch)
        )
        if (
            self.model.puzzle_emb.dtype != torch.float32
        ):  # bf16 engines cast buffers; sign-SGD needs fp32 rows
            self.model.puzzle_emb = self.model.puzzle_emb.float()
        self.sign_sgd = SparseSignSGD(
            self.model.puzzle_emb,
            lr=config.optim.puzzle_emb_lr,
            weight_decay=config.optim.puzzle_emb_weight_decay,
        )
        self.ema = EMA(self.model, config.optim.ema_decay) if config.optim.ema_decay > 0 else None
        self.stream = self.build_stream()
        self.checkpoints = CheckpointManager(self.run_dir, self.world.rank, config.train.keep_checkpoints)
        start = resolve_resume(resume, self.checkpoints)
        if start is not None:
            self.load_checkpoint(start)
        if self.world.rank == 0:
            save_resolved(config, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(config, self.run_dir, self.world.rank, config.train.steps, self.step)
        self._print_summary(start)

    # --- builders --------------------------------------------------------------------------------

    def _check_data(self) -> dict[str, Any]:
        c, d = self.config.model, self.config.data
        if not d.path:
            raise ConfigError(
                "data.path is empty; build a dataset with `hrm-mega prep ...` and point data.path at it"
            )
        manifest = read_manifest(d.path)
        for field in ("vocab_size", "seq_len", "num_puzzle_identifiers"):
            if manifest[field] != getattr(c, field):
                raise ConfigError(
                    f"model.{field}={getattr(c, field)} but {d.path}/manifest.json has {field}={manifest[field]}"
                )
        if self.config.optim.ema_decay > 0 and self.config.parallel.zero_stage == 3:
            raise ConfigError(
                "optim.ema_decay > 0 is not supported with parallel.zero_stage=3; use stage 0-2"
            )
        return manifest

    def build_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if o.name == "adamw":
            return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        return AdamATan2(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)

    def build_stream(self) -> PuzzleStream:
        d, t = self.config.data, self.config.train
        transform = _augmentation(self.manifest["task"]) if d.augment else None
        return PuzzleStream(
            d.path, d.train_split, seed=t.seed, global_batch=t.global_batch, partitions=d.partitions,
            dp_rank=self.world.dp_rank, dp_size=self.world.dp_size, num_workers=d.num_workers,
            shuffle_buffer=d.shuffle_buffer, corrupt_policy=d.corrupt_policy, transform=transform,
        )  # fmt: skip

    # --- one step --------------------------------------------------------------------------------

    def _next_rows(self) -> ACTState:
        if self.act is None:
            batch = self.stream.first_batch()
            return initial_state(self.model, {k: v.to(self.world.device) for k, v in batch.items()})
        if not self.act.halted.any():
            return self.act
        return refill(self.model, self.act, self.stream.take(self.act.halted.nonzero().squeeze(-1)))

    def _set_lr(self) -> float:
        o, t = self.config.optim, self.config.train
        warmup = min(o.warmup_steps, t.steps - 1)
        scale = lr_at(
            self.step, base_lr=1.0, warmup_steps=warmup, total_steps=t.steps, min_ratio=o.lr_min_ratio
        )
        for group in self.engine.optimizer.param_groups:
            group["lr"] = o.lr * scale
        self.sign_sgd.lr = o.puzzle_emb_lr * scale
        return o.lr * scale

    def train_step(self) -> dict[str, float]:
        """One segment for every row, one optimizer step. Returns global metrics for logging."""
        cfg = self.config
        state = self._next_rows()
        lr = self._set_lr()
        ids = state.batch["puzzle_identifiers"]
        puzzle_emb = self.model.puzzle_emb[ids].clone().requires_grad_(True)  # leaf: collects its rows' grads

        micro = cfg.train.micro_batch or self.local_batch
        sums = torch.zeros(len(METRIC_KEYS) + len(LOSS_KEYS) + 2, dtype=torch.float64)
        chunks = []
        for rows in torch.arange(self.local_batch).split(micro):
            sub = _select(state, rows)
            sub = replace(sub, batch={**sub.batch, "puzzle_emb": puzzle_emb[rows]})
            loss, metrics, new_sub, _ = step_segment(
                self.engine, cfg.model, sub, training=True, seed=cfg.train.seed
            )
            # Decide on every rank together: a backward pass on some ranks only would hang the others.
            if _all_finite(loss):
                self.engine.backward(loss)
            sums += _metric_vector(loss, metrics, len(rows))
            chunks.append(replace(new_sub, batch=state.batch))
        self.act = _merge(state, chunks)

        sums = _all_reduce(sums)
        all_finite = bool(sums[-1] == self.world.dp_size * len(chunks))
        grad_norm = float("nan")
        if all_finite:
            grad_norm = self._grad_norm_before_step()
            self.engine.step()
            if math.isnan(grad_norm):
                grad_norm = float(self.engine.get_global_grad_norm())
            self.sign_sgd.step(ids, puzzle_emb.grad)
            if self.ema is not None:
                self.ema.update(self.model)
            self.nonfinite_in_a_row = 0
        else:
            self.engine.zero_grad()
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise TrainingError(
                    f"step {self.step}: non-finite loss in {self.nonfinite_in_a_row} consecutive steps "
                    f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); lower optim.lr or check the data"
                )
        self.step += 1
        return self._format_metrics(sums, lr, grad_norm, all_finite)

    def _grad_norm_before_step(self) -> float:
        """Global L2 norm of the DP-averaged gradients before clipping. ZeRO optimizers compute it in
        their step (read it from the engine afterwards); without ZeRO the gradients sit in .grad."""
        if self.config.parallel.zero_stage > 0:
            return float("nan")
        norms = [p.grad.norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    def _format_metrics(
        self, sums: torch.Tensor, lr: float, grad_norm: float, finite: bool
    ) -> dict[str, float]:
        n_metric, rows = len(METRIC_KEYS), self.config.train.global_batch
        m = dict(zip(METRIC_KEYS, sums[:n_metric].tolist()))
        losses = dict(zip(LOSS_KEYS, (sums[n_metric : n_metric + len(LOSS_KEYS)] / rows).tolist()))
        count = max(m["count"], 1.0)
        out = {
            "loss": float(sums[n_metric + len(LOSS_KEYS)] / rows) if finite else float("nan"),
            **{
                k: v
                for k, v in losses.items()
                if k != "q_continue_loss" or self.config.model.q_target == "bootstrap"
            },
            "lr": lr,
            "grad_norm": grad_norm,
            "halted": int(m["count"]),
            "exact_accuracy": m["exact_accuracy"] / count,
            "token_accuracy": m["token_accuracy"] / count,
            "q_halt_accuracy": m["q_halt_accuracy"] / count,
            "mean_act_steps": m["steps"] / count,
            "skipped_step": int(not finite),
        }
        return out

    # --- the loop --------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        cfg = self.config
        rate = Throughput()
        final_eval: dict[str, float] = {}
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                rate.add(cfg.train.global_batch, cfg.train.global_batch * cfg.model.seq_len)
                self.logger.advance()
                if self.step % cfg.log.log_interval == 0 or self.step == cfg.train.steps:
                    progress = _reduce_progress(self.stream.progress, self.world.dp_size)
                    self.logger.log(self.step, {**metrics, **rate.rates(), **progress})
                if (
                    cfg.train.eval_interval
                    and self.step % cfg.train.eval_interval == 0
                    and self.step < cfg.train.steps
                ):
                    self.log_evaluation()
                if cfg.train.checkpoint_interval and self.step % cfg.train.checkpoint_interval == 0:
                    self.save_checkpoint()
            final_eval = self.log_evaluation()
            if not cfg.train.checkpoint_interval or self.step % cfg.train.checkpoint_interval:
                self.save_checkpoint()
        finally:
            self.logger.close()
            self.stream.close()
        return final_eval

    # --- evaluation ------------------------------------------------------------------------------

    def log_evaluation(self) -> dict[str, float]:
        results: dict[str, float] = {}
        for mode in self.config.train.eval_modes:
            for key, value in self.evaluate(mode).items():
                results[f"eval_{mode}/{key}"] = value
        self.logger.log(self.step, results)
        self.logger.print(f"step {self.step} eval: " + "  ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results

    @torch.no_grad()
    def evaluate(self, mode: str) -> dict[str, float]:
        return evaluate_puzzles(self.model, self.config, self.world, mode, ema=self.ema)

    # --- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        if self.act is not None:
            tensors |= {"act.z_H": self.act.carry.z_H, "act.z_L": self.act.carry.z_L}
            tensors |= {"act.steps": self.act.steps, "act.halted": self.act.halted}
            tensors |= {f"act.batch.{k}": v for k, v in self.act.batch.items()}
        if self.ema is not None:
            tensors |= {f"ema.{k}": v for k, v in self.ema.state_dict()["shadow"].items()}
        client = {
            "step": self.step,
            "stream": self.stream.state_dict(),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "has_act": self.act is not None,
            "world_size": self.world.world_size,
            "config": self.config.to_dict(),
        }
        path = self.checkpoints.save(self.engine, self.step, client, tensors)
        self.logger.print(f"saved checkpoint {path}")
        return path

    def load_checkpoint(self, path: Path) -> None:
        client, tensors = self.checkpoints.load(self.engine, path)
        saved_model = client["config"]["model"]
        for key, value in saved_model.items():
            if getattr(self.config.model, key) != value:
                raise ConfigError(
                    f"model.{key}={getattr(self.config.model, key)!r} differs from the checkpoint's {value!r} ({path})"
                )
        if client["world_size"] != self.world.world_size:
            raise ConfigError(
                f"{path} was saved with {client['world_size']} ranks; this run has {self.world.world_size}"
            )
        self.step = client["step"]
        self.nonfinite_in_a_row = client["nonfinite_in_a_row"]
        self.stream.load_state_dict(client["stream"])
        torch.set_rng_state(tensors["rng.torch"])
        if client["has_act"]:
            dev = self.world.device
            batch = {
                k[len("act.batch.") :]: v.to(dev) for k, v in tensors.items() if k.startswith("act.batch.")
            }
            self.act = ACTState(
                Carry(tensors["act.z_H"].to(dev), tensors["act.z_L"].to(dev)),
                tensors["act.steps"].to(dev),
                tensors["act.halted"].to(dev),
                batch,
            )
        if self.ema is not None:
            shadow = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
            self.ema.load_state_dict({"decay": self.config.optim.ema_decay, "shadow": shadow})

    def _print_summary(self, resumed_from: Path | None) -> None:
        c, w = self.config, self.world
        n = count_parameters(self.model)["total"]
        split = self.manifest["splits"][c.data.train_split]
        lines = [
            f"hrm-mega train: {n:,} parameters (+{self.model.puzzle_emb.numel():,} puzzle-embedding values)",
            f"  world {w.world_size} = tp {c.parallel.tp} x pp {c.parallel.pp} x dp {w.dp_size}; "
            f"ZeRO stage {c.parallel.zero_stage}; {c.train.precision}; device {w.device.type}",
            f"  data {c.data.path}: {split['num_samples']:,} train samples in {len(split['shards'])} shards, "
            f"{c.data.partitions} partitions; global batch {c.train.global_batch}",
            f"  run dir {self.run_dir}; "
            + (f"resumed from {resumed_from} at step {self.step}" if resumed_from else "fresh start"),
        ]
        self.logger.print("\n".join(lines))


# --- helpers -------------------------------------------------------------------------------------


def evaluate_puzzles(
    model: RecursiveReasoner, config: Config, world: ds.World, mode: str, ema: EMA | None = None
) -> dict[str, float]:
    """Evaluates on the eval split in `mode` (fixed | adaptive); every rank takes its share."""
    d, t = config.data, config.train
    batch_size = max(1, t.global_batch // world.dp_size)
    was_training = model.training
    model.eval()
    try:
        with ema.swapped(model) if ema is not None else contextlib.nullcontext():
            batches = iterate_split(
                d.path, d.eval_split, batch_size=batch_size, dp_rank=world.dp_rank, dp_size=world.dp_size,
                corrupt_policy=d.corrupt_policy,
            )  # fmt: skip
            batches = _limit(batches, t.eval_max_samples // world.dp_size if t.eval_max_samples else 0)
            batches = ({k: v.to(world.device) for k, v in b.items()} for b in batches)
            if mode == "fixed":
                records = run_fixed(model, config.model, batches)
            else:
                records = run_adaptive(model, config.model, batches, batch_size)
            sums = _all_reduce(metric_sums(records))
    finally:
        model.train(was_training)
    return metrics_from_sums(sums)


def _limit(batches, max_rows: int):
    if not max_rows:
        yield from batches
        return
    seen = 0
    for b in batches:
        if seen >= max_rows:
            b = {**b, "valid": torch.zeros_like(b["valid"])}  # keep the batch count equal across ranks
        yield b
        seen += b["inputs"].shape[0]


def _augmentation(task: str):
    if task != "sudoku":
        raise ConfigError(f"data.augment=true is only available for sudoku data, not {task!r}")
    return augment_sudoku_sample


def augment_sudoku_sample(sample: dict[str, Any], rng) -> dict[str, Any]:
    """Loader transform: one random validity-preserving symmetry (module level, so workers can pickle it)."""
    from hrm_mega.data.augment import sudoku_augment

    inputs, labels = sudoku_augment(sample["inputs"], sample["labels"], rng)
    return {**sample, "inputs": inputs, "labels": labels}


def _select(state: ACTState, rows: torch.Tensor) -> ACTState:
    return ACTState(
        Carry(state.carry.z_H[rows], state.carry.z_L[rows]),
        state.steps[rows],
        state.halted[rows],
        {k: v[rows] for k, v in state.batch.items()},
    )


def _merge(state: ACTState, chunks: list[ACTState]) -> ACTState:
    if len(chunks) == 1:
        return chunks[0]
    return ACTState(
        Carry(torch.cat([c.carry.z_H for c in chunks]), torch.cat([c.carry.z_L for c in chunks])),
        torch.cat([c.steps for c in chunks]),
        torch.cat([c.halted for c in chunks]),
        state.batch,
    )


def _metric_vector(loss: torch.Tensor, metrics: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
    """[metric sums..., loss-part sums..., loss sum, finite flag] for one micro-batch of `rows` rows."""
    values = [float(metrics[k]) for k in METRIC_KEYS]
    values += [float(metrics[k]) * rows if k in metrics else 0.0 for k in LOSS_KEYS]
    finite = math.isfinite(float(loss.detach()))
    values += [float(loss.detach()) * rows if finite else 0.0, float(finite)]
    return torch.tensor(values, dtype=torch.float64)


def _all_finite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([float(torch.isfinite(loss.detach()).all())])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag[0] == 1)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def _reduce_progress(progress: dict[str, float | int], dp_size: int) -> dict[str, float]:
    t = _all_reduce(torch.tensor([float(v) for v in progress.values()], dtype=torch.float64))
    out = dict(zip(progress, t.tolist()))
    out["epoch"] = out["epoch"] / dp_size  # each rank's fraction of its own partitions
    return {f"data/{k}": v for k, v in out.items()}
