"""The ACT pretraining task for the puzzle family.

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

import math
from dataclasses import replace
from typing import Any

import torch

from hrm_mega.config import Config, ConfigError
from hrm_mega.data.stream import PuzzleStream
from hrm_mega.distributed import data_parallel_group
from hrm_mega.inference.puzzle import metric_sums, metrics_from_sums, run_adaptive, run_fixed
from hrm_mega.models.act import ACTState, initial_state, refill, step_segment
from hrm_mega.models.puzzle import RecursiveReasoner
from hrm_mega.models.recurrence import Carry
from hrm_mega.optim import EMA, SparseSignSGD
from hrm_mega.training import engine as ds
from hrm_mega.training.trainer import Trainer, all_finite, all_reduce, eval_batch_size, evaluation

METRIC_KEYS = ("count", "token_accuracy", "exact_accuracy", "q_halt_accuracy", "segments")
LOSS_KEYS = ("lm_loss", "q_halt_loss", "q_continue_loss")


class PuzzleTrainer(Trainer):
    model: RecursiveReasoner
    sign_sgd: SparseSignSGD
    act: ACTState | None = None
    reshards_data_parallel = False  # the ACT rows in flight belong to their replica

    def manifest_fields(self) -> tuple[str, ...]:
        return ("seq_len", "num_puzzle_identifiers")

    def after_engine(self) -> None:
        if self.model.puzzle_emb.dtype != torch.float32:  # bf16 engines cast buffers; sign-SGD needs fp32
            self.model.puzzle_emb = self.model.puzzle_emb.float()
        o = self.config.optim
        self.sign_sgd = SparseSignSGD(
            self.model.puzzle_emb, lr=o.puzzle_emb_lr, weight_decay=o.puzzle_emb_weight_decay,
            group=data_parallel_group(),
        )  # fmt: skip

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

    def set_lr(self) -> float:
        self.sign_sgd.lr = self.config.optim.puzzle_emb_lr * self.lr_scale()
        return super().set_lr()

    def train_step(self) -> dict[str, float]:
        """One segment for every row, one optimizer step. Returns global metrics for logging."""
        cfg = self.config
        state = self._next_rows()
        lr = self.set_lr()
        ids = state.batch["puzzle_identifiers"]
        puzzle_emb = self.model.puzzle_emb[ids].clone().requires_grad_(True)  # leaf: collects its rows' grads
        self._sparse_step = (ids, puzzle_emb)

        micro = cfg.train.micro_batch or self.local_batch
        sums = torch.zeros(len(METRIC_KEYS) + len(LOSS_KEYS) + 2, dtype=torch.float64)
        chunks = []
        micro_batches = torch.arange(self.local_batch).split(micro)
        for i, rows in enumerate(micro_batches):
            self.start_micro_batch(i, len(micro_batches))
            sub = _select(state, rows)
            sub = replace(sub, batch={**sub.batch, "puzzle_emb": puzzle_emb[rows]})
            loss, metrics, new_sub, _ = step_segment(
                self.engine, cfg.model, sub, training=True, seed=cfg.train.seed
            )
            if all_finite(loss):
                self.engine.backward(loss)
            sums += _metric_vector(loss, metrics, len(rows))
            chunks.append(replace(new_sub, batch=state.batch))
        self.act = _merge(state, chunks)

        sums = all_reduce(sums)
        finite = bool(sums[-1] == self.world.dp_size * len(chunks))
        grad_norm = self.apply_update(finite)
        self.step += 1
        return self._format_metrics(sums, lr, grad_norm, finite)

    def after_optimizer_step(self) -> None:
        ids, puzzle_emb = self._sparse_step
        self.sign_sgd.step(ids, puzzle_emb.grad)

    def step_counts(self) -> tuple[int, int]:
        rows = self.config.train.global_batch
        return rows, rows * self.config.model.seq_len

    def _format_metrics(
        self, sums: torch.Tensor, lr: float, grad_norm: float, finite: bool
    ) -> dict[str, float]:
        n_metric, rows = len(METRIC_KEYS), self.config.train.global_batch
        m = dict(zip(METRIC_KEYS, sums[:n_metric].tolist()))
        losses = dict(zip(LOSS_KEYS, (sums[n_metric : n_metric + len(LOSS_KEYS)] / rows).tolist()))
        if self.config.model.q_target != "bootstrap":
            del losses["q_continue_loss"]
        count = max(m["count"], 1.0)
        return {
            "loss": float(sums[n_metric + len(LOSS_KEYS)] / rows) if finite else float("nan"),
            **losses,
            "lr": lr,
            "grad_norm": grad_norm,
            "halted": int(m["count"]),
            "exact_accuracy": m["exact_accuracy"] / count,
            "token_accuracy": m["token_accuracy"] / count,
            "q_halt_accuracy": m["q_halt_accuracy"] / count,
            "mean_segments": m["segments"] / count,
            "skipped_step": int(not finite),
        }

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate_all(self) -> dict[str, float]:
        results: dict[str, float] = {}
        for mode in self.config.train.eval_modes:
            for key, value in self.evaluate(mode).items():
                results[f"eval_{mode}/{key}"] = value
        return results

    @torch.no_grad()
    def evaluate(self, mode: str) -> dict[str, float]:
        return evaluate_puzzles(self.model, self.config, self.world, mode, ema=self.ema)

    # --- checkpoint state ------------------------------------------------------------------------

    def extra_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        if self.act is not None:
            tensors |= {"act.z_H": self.act.carry.z_H, "act.z_L": self.act.carry.z_L}
            tensors |= {"act.steps": self.act.steps, "act.halted": self.act.halted}
            tensors |= {f"act.batch.{k}": v for k, v in self.act.batch.items()}
        return {"has_act": self.act is not None}, tensors

    def load_extra_state(self, client: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not client["has_act"]:
            return
        dev = self.world.device
        batch = {k[len("act.batch.") :]: v.to(dev) for k, v in tensors.items() if k.startswith("act.batch.")}
        self.act = ACTState(
            Carry(tensors["act.z_H"].to(dev), tensors["act.z_L"].to(dev)),
            tensors["act.steps"].to(dev),
            tensors["act.halted"].to(dev),
            batch,
        )

    def summary_lines(self) -> list[str]:
        return [f"  + {self.model.puzzle_emb.numel():,} puzzle-embedding values (sparse sign-SGD)"]


# --- helpers -------------------------------------------------------------------------------------


def evaluate_puzzles(
    model: RecursiveReasoner, config: Config, world: ds.World, mode: str, ema: EMA | None = None
) -> dict[str, float]:
    """Evaluates on the eval split in `mode` (fixed | adaptive); every rank takes its share."""
    with evaluation(model, config, world, ema) as batches:
        if mode == "fixed":
            records = run_fixed(model, config.model, batches)
        else:
            records = run_adaptive(model, config.model, batches, eval_batch_size(config, world))
        sums = all_reduce(metric_sums(records))
    return metrics_from_sums(sums)


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
