"""The ACT pretraining task for the puzzle family.

One optimizer step is one ACT segment for every row of the global batch (deep supervision):

    halted rows take new samples from the stream       (refill: nothing is dropped)
    loss = act_loss(engine(carry, batch))              (+ a no-grad look-ahead for bootstrap Q targets)
    engine.backward(loss); engine.step()               (AdamATan2 under ZeRO, clipping, accumulation)
    sign_sgd.step(puzzle ids, their gradients)         (the embedding table lives outside ZeRO; none
                                                        when model.puzzle_emb_ndim = 0)
    ema.update(model)

The ACT controller (carry, step counts, current rows) lives here, outside the engine. Everything that
decides the run is keyed by seed and sample, so the same seed gives the same losses at any DP size,
and a resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from hrm_mega.config import Config
from hrm_mega.data.stream import SampleStream
from hrm_mega.distributed import all_finite, all_reduce, all_reduce_sums, data_parallel_group
from hrm_mega.inference.puzzle import metric_sums, metrics_from_sums, run_adaptive, run_fixed
from hrm_mega.models.act import ACTState, initial_state, refill, step_segment
from hrm_mega.models.puzzle import RecursiveReasoner
from hrm_mega.models.recurrence import Carry
from hrm_mega.optim import EMA, SparseSignSGD
from hrm_mega.training import engine as ds
from hrm_mega.training.evaluation import eval_batch_size, evaluation
from hrm_mega.training.metrics import add_micro_batch
from hrm_mega.training.task import Task

if TYPE_CHECKING:
    from hrm_mega.training.trainer import Trainer

METRIC_KEYS = ("count", "token_accuracy", "exact_accuracy", "q_halt_accuracy", "segments")
DECISION_KEYS = ("unsolved", "unsolved_continue", "solved", "solved_halt")  # act_loss: every labelled row
LOSS_KEYS = ("lm_loss", "q_halt_loss", "q_continue_loss")


class PuzzleTask(Task):
    reshards_data_parallel = False  # the ACT rows in flight belong to their replica
    sign_sgd: SparseSignSGD | None = None  # None: the model has no puzzle-embedding table
    act: ACTState | None = None
    _sparse_step: tuple[torch.Tensor, torch.Tensor] | None = None

    def setup(self, trainer: Trainer) -> None:
        model: RecursiveReasoner = trainer.model
        if model.puzzle_emb is None:
            return
        if model.puzzle_emb.dtype != torch.float32:  # bf16 engines cast buffers; sign-SGD needs fp32
            model.puzzle_emb = model.puzzle_emb.float()
        o = self.config.optim
        self.sign_sgd = SparseSignSGD(
            model.puzzle_emb, lr=o.puzzle_emb_lr, weight_decay=o.puzzle_emb_weight_decay,
            group=data_parallel_group(),
        )  # fmt: skip

    def build_stream(self, trainer: Trainer) -> SampleStream:
        transform = augment_sudoku_sample if self.config.data.augment else None  # sudoku only (load_config)
        return self.sample_stream(trainer, self.config.train.global_batch, transform)

    def set_lr_scale(self, scale: float) -> None:
        if self.sign_sgd is not None:
            self.sign_sgd.lr = self.config.optim.puzzle_emb_lr * scale

    # --- one step --------------------------------------------------------------------------------

    def _next_rows(self, trainer: Trainer) -> ACTState:
        if self.act is None:
            batch = trainer.stream.first_batch()
            return initial_state(trainer.model, {k: v.to(trainer.world.device) for k, v in batch.items()})
        if not self.act.halted.any():
            return self.act
        return refill(trainer.model, self.act, trainer.stream.take(self.act.halted.nonzero().squeeze(-1)))

    def train_step(self, trainer: Trainer) -> dict[str, float]:
        """One segment for every row, one optimizer step. Returns global metrics for logging."""
        cfg = self.config
        state = self._next_rows(trainer)
        lr = trainer.set_lr()
        rows_of = self._puzzle_emb_leaf(trainer, state.batch["puzzle_identifiers"])

        micro = cfg.train.micro_batch or trainer.local_batch
        sums = dict.fromkeys((*METRIC_KEYS, *DECISION_KEYS, *LOSS_KEYS, "loss", "finite"), 0.0)
        chunks = []
        micro_batches = torch.arange(trainer.local_batch).split(micro)
        for i, rows in enumerate(micro_batches):
            trainer.start_micro_batch(i, len(micro_batches))
            sub = _select(state, rows)
            sub = replace(sub, batch={**sub.batch, **rows_of(rows)})
            loss, metrics, new_sub, _ = step_segment(
                trainer.engine, cfg.model, sub, training=True, seed=cfg.train.seed
            )
            if all_finite(loss):
                trainer.engine.backward(loss)
            n = len(rows)  # the loss and its parts are means over the micro-batch's rows
            terms = {
                "loss": float(loss.detach()) * n,
                **{k: float(metrics[k]) * n for k in LOSS_KEYS if k in metrics},
            }
            counts = {k: float(metrics[k]) for k in (*METRIC_KEYS, *DECISION_KEYS)}
            add_micro_batch(sums, loss, terms, counts=counts)
            chunks.append(replace(new_sub, batch=state.batch))
        self.act = _merge(state, chunks)

        sums = all_reduce_sums(sums)
        finite = sums["finite"] == trainer.world.dp_size * len(chunks)
        grad_norm = trainer.apply_update(finite)
        return self._step_metrics(sums, lr, grad_norm, finite)

    def _puzzle_emb_leaf(
        self, trainer: Trainer, ids: torch.Tensor
    ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """Copies this step's rows of the table into a leaf that collects their gradients; returns the
        batch entries of a micro-batch's rows (nothing when the model has no table)."""
        if self.sign_sgd is None:
            self._sparse_step = None
            return lambda rows: {}
        puzzle_emb = trainer.model.puzzle_emb[ids].clone().requires_grad_(True)
        self._sparse_step = (ids, puzzle_emb)
        return lambda rows: {"puzzle_emb": puzzle_emb[rows]}

    def after_optimizer_step(self) -> None:
        if self._sparse_step is not None:
            ids, puzzle_emb = self._sparse_step
            self.sign_sgd.step(ids, puzzle_emb.grad)

    def step_counts(self) -> tuple[int, int]:
        rows = self.config.train.global_batch
        return rows, rows * self.config.model.seq_len

    def _step_metrics(
        self, sums: dict[str, float], lr: float, grad_norm: float, finite: bool
    ) -> dict[str, float]:
        rows, count = self.config.train.global_batch, max(sums["count"], 1.0)
        losses = {k: sums[k] / rows for k in LOSS_KEYS}
        if self.config.model.q_target != "bootstrap":
            del losses["q_continue_loss"]
        return {
            "loss": sums["loss"] / rows if finite else float("nan"),
            **losses,
            "lr": lr,
            "grad_norm": grad_norm,
            "halted": int(sums["count"]),
            "exact_accuracy": sums["exact_accuracy"] / count,
            "token_accuracy": sums["token_accuracy"] / count,
            "q_halt_accuracy": sums["q_halt_accuracy"] / count,
            "mean_segments": sums["segments"] / count,
            # The halting rule on every row of the step: the share of wrong rows sent on (what adaptive
            # accuracy needs) and of right rows stopped (what saves compute).
            "q_continue_when_wrong": sums["unsolved_continue"] / max(sums["unsolved"], 1.0),
            "q_halt_when_right": sums["solved_halt"] / max(sums["solved"], 1.0),
            "skipped_step": int(not finite),
        }

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        return evaluate_modes(trainer)

    # --- checkpoint state ------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        if self.act is not None:
            tensors |= {"act.z_H": self.act.carry.z_H, "act.z_L": self.act.carry.z_L}
            tensors |= {"act.steps": self.act.steps, "act.halted": self.act.halted}
            tensors |= {f"act.batch.{k}": v for k, v in self.act.batch.items()}
        return {"has_act": self.act is not None}, tensors

    def load_state(self, trainer: Trainer, client: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if not client["has_act"]:
            return
        dev = trainer.world.device
        batch = {k[len("act.batch.") :]: v.to(dev) for k, v in tensors.items() if k.startswith("act.batch.")}
        self.act = ACTState(
            Carry(tensors["act.z_H"].to(dev), tensors["act.z_L"].to(dev)),
            tensors["act.steps"].to(dev),
            tensors["act.halted"].to(dev),
            batch,
        )

    def summary_lines(self, trainer: Trainer) -> list[str]:
        if trainer.model.puzzle_emb is None:
            return ["  no puzzle embedding (model.puzzle_emb_ndim=0)"]
        return [f"  + {trainer.model.puzzle_emb.numel():,} puzzle-embedding values (sparse sign-SGD)"]


# --- helpers -------------------------------------------------------------------------------------


@torch.no_grad()
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


def evaluate_modes(trainer: Trainer) -> dict[str, float]:
    """evaluate_puzzles in every mode of train.eval_modes, keyed eval_{mode}/{metric}."""
    results: dict[str, float] = {}
    for mode in trainer.config.train.eval_modes:
        metrics = evaluate_puzzles(trainer.model, trainer.config, trainer.world, mode, trainer.ema)
        results |= {f"eval_{mode}/{key}": value for key, value in metrics.items()}
    return results


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
