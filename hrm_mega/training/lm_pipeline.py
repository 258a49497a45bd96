"""The language-model task with pipeline stages (parallel.pp > 1): DeepSpeed's PipelineEngine runs
HRMGemma split into stages of whole CycleBlocks (models/lm_pipeline.py).

One optimizer step is one `engine.train_batch`: DeepSpeed's schedule runs every micro-batch forward
and backward through the stages, sums the tied embedding's gradients, averages over data-parallel
replicas and steps the optimizer. Around it, as in LMTrainer:

    batch = stream.take(all rows)           every stage reads the batch (cheap; keeps streams in step)
    N = cycles of this step                 every stage sets it on its own CycleBlocks
    normalizers = the step's token counts   so every loss term is a step-global token mean
    engine.train_batch(micro-batches)       the loss is computed on the last stage (PipelineLoss)
    metrics: last stage -> every rank       (one all-reduce; other stages contribute zeros)

A non-finite step is skipped inside the optimizer step (StepGuard): the decision needs every
rank's gradients, and DeepSpeed's schedule steps the optimizer itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hrm_mega.config import ConfigError, LMModelConfig, pipeline_stage_blocks
from hrm_mega.distributed import pipeline_topology
from hrm_mega.models.lm_pipeline import build_pipeline_module
from hrm_mega.models.vocab import cross_entropy
from hrm_mega.training.lm import SUM_KEYS, LMTrainer, h_cycles_set
from hrm_mega.training.trainer import all_reduce, client_optimizer, evaluation

EVAL_KEYS = ("nll", "tokens", "cycles")


class PipelineLoss:
    """The last stage's loss: (logit slice, halting sums) and labels -> this micro-batch's share of the
    step's token-mean loss (lm_loss's terms), times `scale`. Keeps the metric sums of the step."""

    def __init__(self, config: LMModelConfig) -> None:
        self.config = config
        self.start(training=True, normalizers=(1.0, 1.0), scale=1.0)

    def start(
        self, training: bool, normalizers: tuple[float, float] = (1.0, 1.0), scale: float = 1.0
    ) -> None:
        self.training, self.normalizers, self.scale = training, normalizers, scale
        self.sums = torch.zeros(len(SUM_KEYS if training else EVAL_KEYS), dtype=torch.float64)

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, halting = outputs
        targets = labels[:, 1:]
        ce_sum = cross_entropy(logits[:, :-1], targets, "softmax").sum()
        tokens = float((targets != -100).sum())
        if not self.training:  # halting[2]: expected cycles summed over the labelled tokens
            self.sums += torch.tensor([float(ce_sum), tokens, float(halting[2])], dtype=torch.float64)
            return ce_sum
        n_labelled, n_masked = self.normalizers
        ce = ce_sum / max(n_labelled, 1.0)
        halt_bce, cost, expected_cycles = halting / max(n_masked, 1.0)
        loss = ce + self.config.halt_loss_weight * halt_bce + self.config.compute_cost_weight * cost
        finite = math.isfinite(float(loss))
        parts = (loss, ce, halt_bce, cost, expected_cycles, 0.0)  # SUM_KEYS order; no distillation
        values = [float(v) if finite else 0.0 for v in parts]
        self.sums += torch.tensor([*values, tokens, float(finite)], dtype=torch.float64)
        return loss * self.scale


class StepGuard:
    """An optimizer step pre-hook, run inside DeepSpeed's OptimizerStep (every rank reaches it once per
    step). When any rank's gradients are not finite, every rank drops its gradients (p.grad = None), so
    the optimizer leaves parameters and state alone: a skipped step. Without ZeRO it also computes the
    global gradient norm and clips (DeepSpeed's fp32 pipeline path reports no norm): split tensor-parallel
    parameters count on every TP rank, replicated ones once, the tied embedding's second copy not at all,
    every stage's parameters once; gradients are already averaged over data-parallel replicas."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, clip: float | None, tp_rank: int, dp_size: int
    ) -> None:
        self.clip, self.tp_rank, self.dp_size = clip, tp_rank, dp_size
        self.skipped, self.grad_norm = False, float("nan")
        optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        flag = torch.tensor([float(finite)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        self.skipped = not bool(flag[0] == 1)
        if self.skipped:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        if self.clip is not None:
            self.grad_norm = self._global_norm(params)
            scale = self.clip / (self.grad_norm + 1e-6)  # DeepSpeed's rule
            if self.clip > 0 and scale < 1:
                for p in params:
                    p.grad.mul_(scale)

    def _global_norm(self, params: list[torch.Tensor]) -> float:
        square = torch.zeros((), dtype=torch.float64)
        for p in params:
            if getattr(p, "ds_pipe_replicated", False):
                continue
            if getattr(p, "tensor_model_parallel", False) or self.tp_rank == 0:
                square += p.grad.detach().double().square().sum().cpu()
        torch.distributed.all_reduce(square)  # every replica adds the same (averaged) gradients
        return float((square / self.dp_size).sqrt())


class PipelineLMTrainer(LMTrainer):
    loss_fn: PipelineLoss
    guard: StepGuard

    def build_model(self) -> torch.nn.Module:
        t = self.config.train
        for name, value in (("train.init_from", t.init_from), ("train.compile", t.compile)):
            if value:
                raise ConfigError(
                    f"{name} is not available with parallel.pp > 1 yet; unset it or use parallel.pp=1"
                )
        self.loss_fn = PipelineLoss(self.config.model)
        return build_pipeline_module(
            self.config.model, t.seed, pipeline_topology(), pipeline_stage_blocks(self.config),
            self.loss_fn, t.activation_checkpointing,
        ).to(self.world.device)  # fmt: skip

    def after_engine(self) -> None:
        super().after_engine()
        own_clip = self.config.parallel.zero_stage == 0  # see deepspeed_config
        self.guard = StepGuard(
            client_optimizer(self.engine), self.config.optim.grad_clip if own_clip else None, self.world.tp_rank,
            self.world.dp_size,
        )  # fmt: skip

    @property
    def reports_metrics(self) -> bool:
        """The one rank per TP group of the last stage whose loss sums count."""
        return self.engine.is_last_stage() and self.world.tp_rank == 0

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        batch = {k: v.to(self.world.device) for k, v in self.stream.take(range(self.local_batch)).items()}
        lr = self.set_lr()
        cycles = self.cycles_for_step()
        micro = cfg.train.micro_batch or self.local_batch
        n_micro = self.world.dp_size * math.ceil(self.local_batch / micro)
        self.loss_fn.start(training=True, normalizers=self._token_counts(batch), scale=n_micro)
        micro_batches = [
            self._pipeline_batch(batch, rows) for rows in torch.arange(self.local_batch).split(micro)
        ]
        with h_cycles_set(self.model, cycles):
            self.engine.train_batch(iter(micro_batches))
        sums = self._from_last_stage(self.loss_fn.sums)
        finite = not self.guard.skipped
        if finite:
            self.after_update()
        else:
            self.count_skipped_step()
        if not finite:
            grad_norm = float("nan")
        elif self.guard.clip is not None:
            grad_norm = self.guard.grad_norm
        else:
            grad_norm = float(self.engine.get_global_grad_norm())
        self.step += 1
        return self.step_metrics(sums, cycles, lr, grad_norm, finite)

    def _pipeline_batch(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> tuple:
        """((input_ids, position_ids, doc_ids, token_mask), labels) for DeepSpeed's loader: the first
        stage reads the inputs, the last the labels. The mask travels as int64 (pipelines send no bool)."""
        mb = {k: v[rows] for k, v in batch.items()}
        mask = self._token_mask(mb).long()
        return (mb["input_ids"], mb["position_ids"], mb["doc_ids"], mask), mb["labels"]

    def _from_last_stage(self, sums: torch.Tensor) -> torch.Tensor:
        """The last stage's sums, summed over data-parallel replicas, on every rank."""
        local = sums if self.reports_metrics else torch.zeros_like(sums)
        return all_reduce(local, group=torch.distributed.group.WORLD)

    # --- evaluation ------------------------------------------------------------------------------

    def evaluate_all(self) -> dict[str, float]:
        self.loss_fn.start(training=False)
        with evaluation(self.model, self.config, self.world, self.ema) as batches:
            for b in batches:
                labels = b["labels"].masked_fill(~b["valid"].bool()[:, None], -100)
                inputs = (b["input_ids"], b["position_ids"], b["doc_ids"], (labels != -100).long())
                self.engine.eval_batch(
                    iter([(inputs, labels)]), compute_loss=True, bcast_loss=False, num_micro_batches=1
                )
        nll, tokens, cycles = self._from_last_stage(self.loss_fn.sums).tolist()
        loss = nll / max(tokens, 1.0)
        results = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "mean_cycles": cycles / max(tokens, 1.0)}
        results = {f"eval/{k}": v for k, v in {**results, "tokens": tokens}.items()}
        baseline = self.manifest.get("extra", {}).get("unigram_entropy_nats")
        if baseline is not None:
            results["eval/unigram_baseline"] = float(baseline)
        return results
