"""The language-model task: HRMGemma on packed text, next-token prediction plus the halting terms.

One optimizer step:

    batch = stream.take(all rows)                    (packed sequences; document-causal masks)
    N = cycles of this step                          (model.h_cycles, or drawn from train.cycles_range)
    loss = CE + halt BCE + compute cost              (lm_loss)  [+ distillation from a teacher]
    engine.backward(loss); engine.step(); ema.update(model)

Cycle sampling is keyed by (seed, step), so every rank draws the same N and a resumed run draws what
the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hrm_mega.config import Config, ConfigError
from hrm_mega.data.stream import PuzzleStream
from hrm_mega.models.lm import HaltingCycleBlock, HRMGemma, lm_loss
from hrm_mega.models.vocab import cross_entropy
from hrm_mega.optim import EMA
from hrm_mega.training import engine as ds
from hrm_mega.training.trainer import Trainer, all_finite, all_reduce, evaluation

# Per micro-batch sums, all-reduced over ranks: each loss term is the micro-batch's share of the step's
# token mean, so the sums are the means of the whole step.
SUM_KEYS = ("loss", "ce", "halt_bce", "compute_cost", "expected_cycles", "distill", "tokens", "finite")


class LMTrainer(Trainer):
    model: HRMGemma
    teacher: HRMGemma | None = None
    _tokens_last_step: int = 0

    def check_data(self) -> dict[str, Any]:
        manifest = super().check_data()
        c, path = self.config.model, self.config.data.path
        if manifest.get("task") != "text":
            raise ConfigError(
                f"{path} holds {manifest.get('task')!r} data; train.task=lm needs a text dataset "
                "(build one with `hrm-mega prep text`)"
            )
        if manifest["seq_len"] > c.max_position:
            raise ConfigError(
                f"model.max_position={c.max_position} is shorter than {path}'s seq_len {manifest['seq_len']}"
            )
        return manifest

    def manifest_fields(self) -> tuple[str, ...]:
        return ()  # an LM's sequence length is the data's; max_position is checked in check_data

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        for block in model.modules():
            if isinstance(block, HaltingCycleBlock):
                block.recompute = self.config.train.activation_checkpointing
        return model

    def after_engine(self) -> None:
        t = self.config.train
        if t.distill_weight > 0 and self.world.model_parallel:
            raise ConfigError(
                "train.distill_weight > 0 needs parallel.tp=1 and parallel.pp=1 (the teacher is a whole "
                "single-process model); distil first, or set train.distill_weight=0"
            )
        if t.distill_weight > 0:
            from hrm_mega.checkpoint.consolidate import load_model

            teacher, teacher_config = load_model(t.distill_from)
            if (
                teacher_config.model.family != "hrm_gemma"
                or teacher_config.model.vocab_size != self.config.model.vocab_size
            ):
                raise ConfigError(
                    f"train.distill_from={t.distill_from}: the teacher must be an hrm_gemma model with "
                    f"vocab_size {self.config.model.vocab_size}"
                )
            self.teacher = teacher.to(self.world.device).eval().requires_grad_(False)

    def build_stream(self) -> PuzzleStream:
        d, t = self.config.data, self.config.train
        if d.augment:
            raise ConfigError("data.augment=true does not apply to text data; set data.augment=false")
        return PuzzleStream(
            d.path, d.train_split, seed=t.seed, global_batch=t.global_batch, partitions=d.partitions,
            dp_rank=self.world.dp_rank, dp_size=self.world.dp_size, num_workers=d.num_workers,
            shuffle_buffer=d.shuffle_buffer, corrupt_policy=d.corrupt_policy,
        )  # fmt: skip

    # --- one step --------------------------------------------------------------------------------

    def cycles_for_step(self) -> int:
        """H cycles of this step: fixed, or uniform over train.cycles_range keyed by (seed, step)."""
        lo_hi = self.config.train.cycles_range
        if not lo_hi:
            return self.config.model.h_cycles
        rng = np.random.default_rng([self.config.train.seed, self.step, 0x6379636C])  # "cycl"
        return int(rng.integers(lo_hi[0], lo_hi[1] + 1))

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        batch = {k: v.to(self.world.device) for k, v in self.stream.take(range(self.local_batch)).items()}
        lr = self.set_lr()
        cycles = self.cycles_for_step()
        micro = cfg.train.micro_batch or self.local_batch
        n_micro = self.world.dp_size * math.ceil(self.local_batch / micro)
        # Every term is a mean over the tokens of the whole step (all ranks and micro-batches), so a step
        # is the same at any DP size; DeepSpeed divides gradients by dp x accumulation, undone here.
        normalizers = self._token_counts(batch)
        sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
        with h_cycles_set(self.model, cycles):
            chunks = torch.arange(self.local_batch).split(micro)
            for i, rows in enumerate(chunks):
                self.start_micro_batch(i, len(chunks))
                mb = {k: v[rows] for k, v in batch.items()}
                parts = self.loss(mb, normalizers)
                if all_finite(parts["loss"]):
                    self.engine.backward(parts["loss"] * n_micro)
                sums += _sum_vector(parts, int((mb["labels"][:, 1:] != -100).sum()))
        sums = all_reduce(sums)
        finite = bool(sums[-1] == n_micro)
        grad_norm = self.apply_update(finite)
        self.step += 1
        return self.step_metrics(sums, cycles, lr, grad_norm, finite)

    def step_metrics(
        self, sums: torch.Tensor, cycles: int, lr: float, grad_norm: float, finite: bool
    ) -> dict[str, float]:
        """The logged metrics of a step from its SUM_KEYS sums over every rank and micro-batch."""
        self._tokens_last_step = int(sums[SUM_KEYS.index("tokens")])
        means = dict(zip(SUM_KEYS[:-2], sums[:-2].tolist()))  # the micro-batches' shares add up to the means
        if not finite:
            means["loss"] = float("nan")
        out = {**means, "ppl": math.exp(min(means["ce"], 50.0)), "cycles": cycles, "lr": lr}
        if not self.teacher:
            del out["distill"]
        return {**out, "grad_norm": grad_norm, "skipped_step": int(not finite)}

    def _token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["input_ids"] != int(self.manifest.get("pad_id", 0))

    def _token_counts(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(labelled targets, real tokens) of the whole step, over every rank."""
        local = [float((batch["labels"][:, 1:] != -100).sum()), float(self._token_mask(batch).sum())]
        labelled, real = all_reduce(torch.tensor(local, dtype=torch.float64)).tolist()
        return labelled, real

    def loss(self, mb: dict[str, torch.Tensor], normalizers: tuple[float, float]) -> dict[str, torch.Tensor]:
        """One micro-batch's share of the step's token-mean losses (lm_loss), plus distillation when a
        teacher is configured."""
        c, t = self.config.model, self.config.train
        logits, aux = self.engine(mb["input_ids"], position_ids=mb["position_ids"], doc_ids=mb["doc_ids"])
        parts = lm_loss(
            logits, mb["labels"], aux, c, token_mask=self._token_mask(mb), normalizers=normalizers
        )
        parts["distill"] = logits.new_zeros(())
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits, _ = self.teacher(
                    mb["input_ids"], position_ids=mb["position_ids"], doc_ids=mb["doc_ids"]
                )
            parts["distill"] = distillation_loss(
                logits, teacher_logits, mb["labels"], t.distill_temperature, normalizer=normalizers[0]
            )
            parts["loss"] = parts["loss"] + t.distill_weight * parts["distill"]
        return parts

    def step_counts(self) -> tuple[int, int]:
        return self.config.train.global_batch, self._tokens_last_step

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate_all(self) -> dict[str, float]:
        results = {
            f"eval/{k}": v for k, v in evaluate_lm(self.model, self.config, self.world, self.ema).items()
        }
        baseline = self.manifest.get("extra", {}).get("unigram_entropy_nats")
        if baseline is not None:
            results["eval/unigram_baseline"] = float(baseline)
        return results

    def summary_lines(self) -> list[str]:
        c, t = self.config.model, self.config.train
        cycles = (
            f"{t.cycles_range[0]}..{t.cycles_range[1]} (sampled per step)"
            if t.cycles_range
            else str(c.h_cycles)
        )
        return [f"  {c.num_groups} CycleBlocks, H cycles {cycles}, L cycles {c.l_cycles}, grad {c.grad_mode}"]


# --- helpers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def h_cycles_set(model: torch.nn.Module, cycles: int) -> Iterator[None]:
    """Runs every CycleBlock of the model (or of this pipeline stage) with `cycles` H cycles."""
    blocks = [m for m in model.modules() if isinstance(m, HaltingCycleBlock)]
    saved = [b.h_cycles for b in blocks]
    for b in blocks:
        b.h_cycles = cycles
    try:
        yield
    finally:
        for b, n in zip(blocks, saved):
            b.h_cycles = n


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    normalizer: float | None = None,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over the tokens that have a label
    (position i predicts labels[i+1], as in lm_loss); `normalizer` replaces this batch's count of them."""
    mask = labels[:, 1:] != -100
    s = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, dim=-1)
    kl_sum = F.kl_div(s, t, log_target=True, reduction="sum")
    count = normalizer if normalizer is not None else float(mask.sum())
    return kl_sum / max(count, 1.0) * temperature**2


def _sum_vector(parts: dict[str, torch.Tensor], tokens: int) -> torch.Tensor:
    finite = math.isfinite(float(parts["loss"].detach()))
    values = [float(parts[k].detach()) if finite else 0.0 for k in SUM_KEYS[:-2]]
    return torch.tensor([*values, float(tokens), float(finite)], dtype=torch.float64)


@torch.no_grad()
def evaluate_lm(model: HRMGemma, config: Config, world: ds.World, ema: EMA | None = None) -> dict[str, float]:
    """Token-level loss and perplexity on the eval split (every rank takes its share), and the expected
    cycles the halting heads would spend."""
    sums = torch.zeros(3, dtype=torch.float64)  # nll sum, labelled tokens, expected-cycles sum over tokens
    with evaluation(model, config, world, ema) as batches:
        for b in batches:
            labels = b["labels"].masked_fill(~b["valid"].bool()[:, None], -100)
            logits, aux = model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
            target = labels[:, 1:]
            nll = cross_entropy(logits[:, :-1], target, "softmax").sum()
            tokens = int((target != -100).sum())
            parts = lm_loss(logits, labels, aux, config.model, token_mask=labels != -100)
            sums += torch.tensor(
                [float(nll), tokens, float(parts["expected_cycles"]) * tokens], dtype=torch.float64
            )
    nll, tokens, cycles = all_reduce(sums).tolist()
    loss = nll / max(tokens, 1.0)
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "mean_cycles": cycles / max(tokens, 1.0),
        "tokens": tokens,
    }
