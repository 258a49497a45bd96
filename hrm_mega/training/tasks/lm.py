"""The language-model task: HRMGemma on packed text, next-token prediction plus the halting terms.

One optimizer step:

    batch = stream.take(all rows)                    (packed sequences; document-causal masks)
    N = cycles of this step                          (model.h_cycles, or drawn from train.cycles_range)
    normalizers = the step's token counts            (every loss term is a step-global token mean)
    loss = CE + halt BCE + compute cost              (lm_loss)  [+ distillation from a teacher]
    engine.backward(loss); engine.step(); ema.update(model)

With pipeline stages (parallel.pp > 1) the engine step differs, not the task: DeepSpeed's PipelineEngine
runs HRMGemma split into stages of whole CycleBlocks (models/lm_pipeline.py), and one
`engine.train_batch` runs every micro-batch forward and backward through the stages, sums the tied
embedding's gradients, averages over replicas and steps the optimizer. The last stage computes the same
loss terms (lm_loss_terms) from the logits and the halting sums the stages pass along; a non-finite
step is skipped inside the optimizer step (StepGuard), because the decision needs every rank's
gradients and DeepSpeed's schedule steps the optimizer itself.

Cycle sampling is keyed by (seed, step), so every rank draws the same N and a resumed run draws what
the uninterrupted one would have.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hrm_mega.config import Config, LMModelConfig, pipeline_stage_blocks
from hrm_mega.config.model import VisionConfig
from hrm_mega.data.collate import select_rows
from hrm_mega.data.decode import IMAGE_TEXT_TASK
from hrm_mega.data.images import ImageProcessing, ImageSpec, normalize_pixels
from hrm_mega.data.mixture import MixtureStream, Source, Stage
from hrm_mega.data.shards import read_manifest
from hrm_mega.data.stream import SampleStream
from hrm_mega.distributed import all_finite, all_reduce_sums, pipeline_topology
from hrm_mega.models.lm import HaltingCycleBlock, HRMGemma, halting_sums, lm_loss, lm_loss_terms
from hrm_mega.models.lm_pipeline import build_pipeline_module, pipeline_inputs
from hrm_mega.models.vocab import cross_entropy, kl_divergence, label_is_argmax
from hrm_mega.optim import EMA
from hrm_mega.training import engine as ds
from hrm_mega.training.engine import client_optimizer
from hrm_mega.training.evaluation import evaluation
from hrm_mega.training.metrics import add_micro_batch
from hrm_mega.training.task import Task, load_init_weights

if TYPE_CHECKING:
    from hrm_mega.training.trainer import Trainer

# Per-step sums over micro-batches and ranks: each loss term is the micro-batch's share of the step's
# token mean, so the sums are the means of the whole step.
LOSS_KEYS = ("loss", "ce", "halt_bce", "compute_cost", "expected_cycles", "distill")


class LMTask(Task):
    teacher: Teacher | None = None
    _tokens_last_step: int = 0

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.pipeline = config.parallel.pp > 1

    def read_data(self) -> dict[str, Any]:
        manifest = super().read_data()
        self.image_processing = image_processing(self.config)
        return manifest

    def build_model(self, trainer: Trainer) -> torch.nn.Module:
        t, w = self.config.train, trainer.world
        if t.distill_weight > 0:
            from hrm_mega.checkpoint.consolidate import load_state

            # every rank reads it (the checkpoint's integrity check is collective); the ranks that hold
            # the logits keep it
            state, teacher_config = load_state(t.distill_from)
            if not self.pipeline or w.pp_rank == w.layout.pp - 1:
                self.teacher = Teacher(self.config, teacher_config, state, w.device)
            del state
        if not self.pipeline:
            model = super().build_model(trainer)
            for block in model.modules():
                if isinstance(block, HaltingCycleBlock):
                    block.recompute = t.activation_checkpointing
            return model
        self.pipeline_loss = PipelineLoss(self.config.model, self.teacher)
        model = build_pipeline_module(
            self.config.model, t.seed, pipeline_topology(), pipeline_stage_blocks(self.config),
            self.pipeline_loss, t.activation_checkpointing,
        ).to(trainer.world.device)  # fmt: skip
        if t.init_from:  # this stage's share of the whole model's weights
            self.fresh_keys, self.init_config = load_init_weights(model, self.config, self.keep_fresh)
        return model

    def setup(self, trainer: Trainer) -> None:
        if self.pipeline:
            own_clip = self.config.parallel.zero_stage == 0  # see engine.deepspeed_config
            clip = self.config.optim.grad_clip if own_clip else None
            self.guard = StepGuard(client_optimizer(trainer.engine), clip, trainer.world)

    # --- one step --------------------------------------------------------------------------------

    def cycles_for_step(self, step: int) -> int:
        """H cycles of this step: fixed, or uniform over train.cycles_range keyed by (seed, step)."""
        lo_hi = self.config.train.cycles_range
        if not lo_hi:
            return self.config.model.h_cycles
        rng = np.random.default_rng([self.config.train.seed, step, 0x6379636C])  # "cycl"
        return int(rng.integers(lo_hi[0], lo_hi[1] + 1))

    def train_step(self, trainer: Trainer) -> dict[str, float]:
        local = trainer.local_batch
        batch = {k: v.to(trainer.world.device) for k, v in trainer.stream.take(range(local)).items()}
        batch["labels"] = self.loss_labels(batch)
        lr = trainer.set_lr()
        cycles = self.cycles_for_step(trainer.step)
        chunks = torch.arange(local).split(self.config.train.micro_batch or local)
        # Every term is a mean over the tokens of the whole step (all ranks and micro-batches), so a step
        # is the same at any DP size; DeepSpeed divides gradients by dp x accumulation, undone here.
        n_micro = trainer.world.dp_size * len(chunks)
        normalizers = self._token_counts(batch)
        micro_batches = [select_rows(batch, rows) for rows in chunks]  # rows with their images
        step = self._pipeline_step if self.pipeline else self._engine_step
        sums, finite, grad_norm = step(trainer, micro_batches, cycles, normalizers, n_micro)
        self._tokens_last_step = int(sums["tokens"])
        means = {k: sums[k] for k in LOSS_KEYS}  # the micro-batches' shares add up to the means
        if not finite:
            means["loss"] = float("nan")
        if not self.config.train.distill_weight:
            del means["distill"]
        out = {**means, "ppl": math.exp(min(means["ce"], 50.0)), "cycles": cycles, "lr": lr}
        return {**out, "grad_norm": grad_norm, "skipped_step": int(not finite)}

    def _engine_step(
        self, trainer: Trainer, micro_batches: list[dict[str, torch.Tensor]], cycles: int,
        normalizers: tuple[float, float], n_micro: int,
    ) -> tuple[dict[str, float], bool, float]:  # fmt: skip
        sums = dict.fromkeys((*LOSS_KEYS, "tokens", "finite"), 0.0)
        for i, mb in enumerate(micro_batches):
            trainer.start_micro_batch(i, len(micro_batches))
            parts = self.loss(trainer.engine, mb, normalizers, cycles)
            if all_finite(parts["loss"]):
                trainer.engine.backward(parts["loss"] * n_micro)
            tokens = float((mb["labels"][:, 1:] != -100).sum())
            add_micro_batch(sums, parts["loss"], _terms(parts), counts={"tokens": tokens})
        sums = all_reduce_sums(sums)
        finite = sums["finite"] == n_micro
        return sums, finite, trainer.apply_update(finite)

    def _pipeline_step(
        self, trainer: Trainer, micro_batches: list[dict[str, torch.Tensor]], cycles: int,
        normalizers: tuple[float, float], n_micro: int,
    ) -> tuple[dict[str, float], bool, float]:  # fmt: skip
        self.pipeline_loss.start(normalizers, scale=n_micro)
        trainer.engine.train_batch(iter([self._stage_inputs(mb, cycles) for mb in micro_batches]))
        sums = from_last_stage(trainer.engine, trainer.world, self.pipeline_loss.sums)
        finite = not self.guard.skipped
        trainer.count_update(applied=finite)
        if not finite:
            grad_norm = float("nan")
        elif self.guard.clip is not None:
            grad_norm = self.guard.grad_norm
        else:
            grad_norm = float(trainer.engine.get_global_grad_norm())
        return sums, finite, grad_norm

    def _stage_inputs(self, mb: dict[str, torch.Tensor], cycles: int) -> tuple:
        """(pipeline_inputs, labels) for DeepSpeed's loader: the first stage reads the inputs (with the
        step's H cycles), the last the labels; when distilling, followed by the teacher's inputs (the
        teacher runs on the last stage)."""
        mask, pixels = self._token_mask(mb), self.pixel_values(mb)
        ids, positions, docs = mb["input_ids"], mb["position_ids"], mb["doc_ids"]
        inputs = pipeline_inputs(ids, positions, docs, mask, cycles, pixels)
        if not self.config.train.distill_weight:
            return inputs, mb["labels"]
        return inputs, (mb["labels"], ids, positions, docs, *(() if pixels is None else (pixels,)))

    def pixel_values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch_pixel_values(batch, self.config.model.vision, self.image_processing)

    def loss_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The labels the loss sees: on rows of prompt/answer datasets only the answers' (with
        data.answer_only_loss), every document token's elsewhere."""
        return answer_only(batch) if self.config.data.answer_only_loss else batch["labels"]

    def _token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["input_ids"] != int(self.manifest.get("pad_id", 0))

    def _token_counts(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(labelled targets, real tokens) of the whole step, over every rank."""
        local = {
            "labelled": float((batch["labels"][:, 1:] != -100).sum()),
            "real": float(self._token_mask(batch).sum()),
        }
        counts = all_reduce_sums(local)
        return counts["labelled"], counts["real"]

    def loss(
        self, model: Any, mb: dict[str, torch.Tensor], normalizers: tuple[float, float], cycles: int
    ) -> dict[str, torch.Tensor]:
        """One micro-batch's share of the step's token-mean losses (lm_loss) at `cycles` H cycles, plus
        distillation when a teacher is configured (the teacher runs its own config's h_cycles)."""
        c, t = self.config.model, self.config.train
        ids, positions, docs = mb["input_ids"], mb["position_ids"], mb["doc_ids"]
        pixels = self.pixel_values(mb)  # every step, even one without images: all ranks' vision grads exist
        # Without a teacher or correctness targets nothing needs the logits: the model computes the CE
        # through its head in chunks (logits None; at parallel.tp=1, see HRMGemma.forward).
        fused = self.teacher is None and c.halt_target != "correct"
        logits, aux = model(
            ids, pixel_values=pixels, position_ids=positions, doc_ids=docs, cycles=cycles,
            labels=mb["labels"] if fused else None,
        )  # fmt: skip
        # halt_target=correct decides on answers and text, not on hidden targets (answer 2): those are
        # intermediate results later tokens read, and a token frozen once its own value is right
        # offers them its earlier state (docs/benchmarks.md, trace: 18-24% exact against 96%).
        halt_labels = mb["labels"].masked_fill(mb["answer"] == 2, -100)
        parts = lm_loss(
            logits, mb["labels"], aux, c, token_mask=self._token_mask(mb), normalizers=normalizers,
            due=mb.get("due"), halt_labels=halt_labels,
        )  # fmt: skip
        parts["distill"] = parts["loss"].new_zeros(())
        if self.teacher is not None:
            parts["distill"] = self.teacher.loss(
                logits, mb["labels"], normalizers[0], ids, positions, docs, pixels
            )
            parts["loss"] = parts["loss"] + t.distill_weight * parts["distill"]
        return parts

    def step_counts(self) -> tuple[int, int]:
        return self.config.train.global_batch, self._tokens_last_step

    # --- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def build_stream(self, trainer: Trainer) -> Any:
        """A SampleStream over data.path, or a MixtureStream over data.sources (each source a SampleStream
        of its own, seeded apart)."""
        d, t, w = self.config.data, self.config.train, trainer.world
        if not d.sources:
            return super().build_stream(trainer)
        sources = [
            Source(
                s.name,
                s.weight,
                SampleStream(
                    s.path,
                    d.train_split,
                    seed=t.seed + 1000 * i,
                    global_batch=t.global_batch,
                    partitions=d.partitions,
                    dp_rank=w.dp_rank,
                    dp_size=w.dp_size,
                    num_workers=d.num_workers,
                    shuffle_buffer=d.shuffle_buffer,
                    corrupt_policy=d.corrupt_policy,
                    shard_url=s.shard_url,
                    read_retries=d.read_retries,
                    in_order=not s.shuffle,
                ),
            )  # fmt: skip
            for i, s in enumerate(d.sources)
        ]
        names = [s.name for s in d.sources]
        tokens_per_step = t.global_batch * int(self.manifest["seq_len"])  # every step reads B packed rows
        stages = [
            Stage(
                st.until_step or -(-st.until_tokens // tokens_per_step),  # the step that has read them
                tuple(st.weights.get(n, 0.0) for n in names),
                st.anneal == "linear",
            )
            for st in d.curriculum
        ]
        return MixtureStream(
            sources, seed=t.seed, global_batch=t.global_batch, dp_rank=w.dp_rank, dp_size=w.dp_size,
            curriculum=stages, stop_at_end=d.source_end == "stop",
        )  # fmt: skip

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Token-level loss and perplexity on the eval split (every rank takes its share), the expected
        cycles the halting heads would spend, and on prompt/answer data the answers' exact match; for a
        mixture, on every source's eval split too (eval/NAME/...; eval/... is the first source's)."""
        pipeline = (trainer.engine, self.pipeline_loss) if self.pipeline else None
        results = evaluate_lm(trainer.model, self.config, trainer.world, trainer.ema, pipeline=pipeline)
        results = {f"eval/{k}": v for k, v in results.items()}
        baseline = trainer.manifest.get("extra", {}).get("unigram_entropy_nats")
        if baseline is not None:
            results["eval/unigram_baseline"] = float(baseline)
        for source in self.config.data.sources:
            data = replace(self.config.data, path=source.path, shard_url=source.shard_url, sources=[])
            config = replace(self.config, data=data)
            own = evaluate_lm(trainer.model, config, trainer.world, trainer.ema, pipeline=pipeline)
            results |= {f"eval/{source.name}/{k}": v for k, v in own.items()}
        return results

    def summary_lines(self, trainer: Trainer) -> list[str]:
        c, t = self.config.model, self.config.train
        lo_hi = t.cycles_range
        cycles = f"{lo_hi[0]}..{lo_hi[1]} (sampled per step)" if lo_hi else str(c.h_cycles)
        return [f"  {c.num_groups} CycleBlocks, H cycles {cycles}, L cycles {c.l_cycles}, grad {c.grad_mode}"]


# --- the pipeline engine's pieces ----------------------------------------------------------------


class PipelineLoss:
    """The last stage's loss: (logit slice, halting sums) and labels -> this micro-batch's share of the
    step's token-mean loss (lm_loss_terms), times `scale`. Keeps the step's metric sums; with
    normalizers=None (evaluation) the sums are the eval split's NLL, tokens and expected cycles."""

    def __init__(self, config: LMModelConfig, teacher: Teacher | None = None) -> None:
        self.config, self.teacher = config, teacher
        self.start(normalizers=(1.0, 1.0))

    def start(self, normalizers: tuple[float, float] | None, scale: float = 1.0) -> None:
        self.normalizers, self.scale = normalizers, scale
        keys = (*LOSS_KEYS, "tokens", "finite") if normalizers is not None else EVAL_KEYS
        self.sums = dict.fromkeys(keys, 0.0)

    def __call__(
        self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor | tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        logits, halting = outputs[:2]  # a value head's values follow (models/lm_pipeline.py)
        if self.normalizers is None:  # evaluation: labels are (labels, answer_docs)
            labels, answer_docs = labels
            self.score(logits, halting[2], labels, answer_docs)
            return logits.new_zeros(())
        teacher_inputs = ()
        if isinstance(labels, tuple):  # distilling: (labels, ids, positions, doc_ids[, pixel_values])
            labels, *teacher_inputs = labels
        targets = labels[:, 1:]
        ce_sum = cross_entropy(logits[:, :-1], targets, "softmax").sum()
        tokens = float((targets != -100).sum())
        parts = lm_loss_terms(ce_sum, halting, self.config, self.normalizers)
        parts["distill"] = parts["loss"].new_zeros(())
        if self.teacher is not None:
            parts["distill"] = self.teacher.loss(logits, labels, self.normalizers[0], *teacher_inputs)
            parts["loss"] = parts["loss"] + self.teacher.weight * parts["distill"]
        add_micro_batch(self.sums, parts["loss"], _terms(parts), counts={"tokens": tokens})
        return parts["loss"] * self.scale

    @torch.no_grad()
    def score(
        self, logits: torch.Tensor, cycles: torch.Tensor, labels: torch.Tensor, answer_docs: torch.Tensor
    ) -> None:
        """Adds an eval batch to the sums: NLL and count of the targets, the expected cycles summed over
        the labelled positions, and the answers (answer_counts) with how many greedy decoding gets
        exactly right."""
        targets = labels[:, 1:]
        nll = cross_entropy(logits[:, :-1], targets, "softmax").sum()
        answers, exact = answer_counts(label_is_argmax(logits[:, :-1], targets), answer_docs[:, 1:])
        values = (float(nll), float((targets != -100).sum()), float(cycles), float((labels != -100).sum()))
        for k, v in zip(EVAL_KEYS, (*values, answers, exact)):
            self.sums[k] += v


class Teacher:
    """train.distill_from: a frozen HRMGemma of its own config (and h_cycles), held where the student's
    logits are: on every rank without pipeline stages, on the last stage's ranks with them (there it
    reads the micro-batch's ids from the labels DeepSpeed hands the loss, so no teacher state crosses a
    stage). It is split over the run's tensor-parallel group exactly as the student is (megatron-core's
    layers, the whole checkpoint's TP share loaded in memory), so its logits come out as this rank's
    vocabulary slice, which the vocab-parallel KL (models/vocab.kl_divergence) takes without gathering
    the vocabulary.

    Why not cut the teacher into the student's stages: its depth is its own (only the vocabulary must
    match), so its CycleBlocks need not fall at the student's stage boundaries, and its hidden states
    would have to travel with the student's through DeepSpeed's one-tensor stage interface. Held whole
    on the last stage, it costs those ranks its weights / tp and one no-grad forward per micro-batch;
    data-parallel replicas (any ZeRO stage: it is no engine parameter) each hold their own."""

    def __init__(
        self, config: Config, teacher_config: Config, state: dict[str, torch.Tensor], device: torch.device
    ) -> None:
        """state, teacher_config: the whole teacher's weights and config (checkpoint.consolidate.load_state)."""
        from hrm_mega.config.checks import check_teacher
        from hrm_mega.models import build_model
        from hrm_mega.training.task import copy_whole_weights

        t = config.train
        check_teacher(config, teacher_config.model)  # load_config checked it; the files may have changed
        with torch.random.fork_rng(devices=[]):  # the student's initialisation draws as without a teacher
            model = build_model(teacher_config.model)
        copy_whole_weights(model, teacher_config.model, state, f"train.distill_from={t.distill_from}")
        self.model = model.to(device).eval().requires_grad_(False)
        self.weight, self.temperature = t.distill_weight, t.distill_temperature

    def loss(
        self, student_logits: torch.Tensor, labels: torch.Tensor, normalizer: float, ids: torch.Tensor,
        positions: torch.Tensor, docs: torch.Tensor, pixels: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The micro-batch's share of the step's distillation term (distillation_loss)."""
        with torch.no_grad():
            pixels = pixels if self.model.vision is not None else None
            teacher_logits, _ = self.model(ids, pixel_values=pixels, position_ids=positions, doc_ids=docs)
        return distillation_loss(student_logits, teacher_logits, labels, self.temperature, normalizer)


class StepGuard:
    """An optimizer step pre-hook, run inside DeepSpeed's OptimizerStep (every rank reaches it once per
    step). When any rank's gradients are not finite, every rank drops its gradients (p.grad = None), so
    the optimizer leaves parameters and state alone: a skipped step. Without ZeRO it also computes the
    global gradient norm and clips (DeepSpeed's fp32 pipeline path reports no norm): split tensor-parallel
    parameters count on every TP rank, replicated ones once, the tied embedding's second copy not at all,
    every stage's parameters once; gradients are already averaged over data-parallel replicas."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip: float | None, world: ds.World) -> None:
        self.clip, self.world = clip, world
        self.skipped, self.grad_norm = False, float("nan")
        optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        flag = torch.tensor([float(finite)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        self.skipped = not bool(flag[0] == 1)
        if self.skipped:
            optimizer.zero_grad(set_to_none=True)
            return
        if self.clip is not None:
            self.grad_norm = ds.grad_norm(params, self.world)
            scale = self.clip / (self.grad_norm + 1e-6)  # DeepSpeed's rule
            if self.clip > 0 and scale < 1:
                for p in params:
                    p.grad.mul_(scale)


# --- helpers -------------------------------------------------------------------------------------

# tokens: targets; labelled: positions with a label; answers: answer spans, answers_exact: all right
EVAL_KEYS = ("nll", "tokens", "cycles", "labelled", "answers", "answers_exact")


def answer_only(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The labels with every target outside an answer span or a hidden target (batch["answer"] 1 or 2)
    ignored (-100), on the rows of datasets that mark spans (batch["answer_spans"]); other rows keep
    theirs."""
    keep = batch["answer"].bool() | ~batch["answer_spans"].bool()[:, None]
    return batch["labels"].masked_fill(~keep, -100)


def answer_documents(batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per position, the document piece (doc_ids) whose answer that labelled token belongs to; -1 for
    tokens outside answer spans."""
    return torch.where((batch["answer"] == 1) & (labels != -100), batch["doc_ids"], -1)


def answer_counts(correct: torch.Tensor, answer_docs: torch.Tensor) -> tuple[int, int]:
    """(answers, answers exactly right) over a batch: an answer is the answer-span targets of one
    document piece of one row (answer_docs >= 0, ids per row), exactly right when greedy decoding
    predicts every one of them (`correct`, teacher-forced: given the right prefix, the argmax of
    every position is the next answer token, so greedy generation from the prompt reproduces the
    answer and its EOS)."""
    rows, width = answer_docs.shape
    key = answer_docs + torch.arange(rows, device=answer_docs.device)[:, None] * (width + 1)
    spans = answer_docs >= 0
    answers = torch.unique(key[spans]).numel()
    return answers, answers - torch.unique(key[spans & ~correct]).numel()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    normalizer: float | None = None,
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over the tokens that have a label
    (position i predicts labels[i+1], as in lm_loss); `normalizer` replaces this batch's count of them.
    Under tensor parallelism both logits are this rank's vocabulary slice (models/vocab.kl_divergence)."""
    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    count = normalizer if normalizer is not None else float(mask.sum())
    return kl_divergence(s, t).sum() / max(count, 1.0) * temperature**2


def _terms(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(parts[k].detach()) for k in LOSS_KEYS}


def eval_results(sums: dict[str, float]) -> dict[str, float]:
    """loss, ppl, mean_cycles and tokens from the eval split's summed NLL, tokens and expected cycles."""
    loss = sums["nll"] / max(sums["tokens"], 1.0)
    out = {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "mean_cycles": sums["cycles"] / max(sums["labelled"], 1.0),
        "tokens": sums["tokens"],
    }
    if sums["answers"]:
        out |= {"answer_exact": sums["answers_exact"] / sums["answers"], "answers": sums["answers"]}
    return out


@torch.no_grad()
def evaluate_lm(
    model: HRMGemma, config: Config, world: ds.World, ema: EMA | None = None, cycles: int | None = None,
    pipeline: tuple[Any, PipelineLoss] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Token-level loss and perplexity on the eval split (every rank takes its share) at `cycles` H
    cycles (default model.h_cycles), the expected cycles the halting heads would spend, and on
    prompt/answer data the share of answers greedy decoding gets exactly right (answer_exact; the loss
    is the answers' with data.answer_only_loss). With pipeline stages, `pipeline` is (the
    PipelineEngine, its last stage's PipelineLoss), which runs the batches."""
    scores = PipelineLoss(config.model) if pipeline is None else pipeline[1]
    scores.start(normalizers=None)
    processing = image_processing(config)
    with evaluation(model, config, world, ema) as batches:
        for b in batches:
            pixels = batch_pixel_values(b, config.model.vision, processing)
            labels = b["labels"].masked_fill(~b["valid"].bool()[:, None], -100)
            answer_docs = answer_documents(b, labels)
            if config.data.answer_only_loss:
                labels = answer_only({**b, "labels": labels})
            ids, positions, docs, mask = b["input_ids"], b["position_ids"], b["doc_ids"], labels != -100
            if pipeline is None:
                logits, aux = model(
                    ids, pixel_values=pixels, position_ids=positions, doc_ids=docs, cycles=cycles
                )
                scores.score(logits, halting_sums(aux, mask)[2], labels, answer_docs)
            else:
                inputs = pipeline_inputs(ids, positions, docs, mask, cycles or config.model.h_cycles, pixels)
                pipeline[0].eval_batch(
                    iter([(inputs, (labels, answer_docs))]), compute_loss=True, bcast_loss=False,
                    num_micro_batches=1,
                )  # fmt: skip
    if pipeline is None:
        return eval_results(all_reduce_sums(scores.sums))
    return eval_results(from_last_stage(pipeline[0], world, scores.sums))


def image_processing(config: Config) -> ImageProcessing | None:
    """How the run's image-text data was preprocessed (its manifest's extra.image; the config checks make
    every image source agree), for rescaling and normalising its batches' pixels on the device. None for a
    model without images."""
    vision = config.model.vision
    if vision is None:
        return None
    for path in [config.data.path, *(s.path for s in config.data.sources)]:
        manifest = read_manifest(path)
        if manifest.get("task") == IMAGE_TEXT_TASK:
            return ImageSpec.from_json(manifest["extra"]["image"]).processing
    return ImageProcessing.for_model(vision)


def batch_pixel_values(
    batch: dict[str, torch.Tensor], vision: VisionConfig | None, processing: ImageProcessing | None
) -> torch.Tensor | None:
    """The batch's images as the model's pixel_values (float32 [n_images, 3, S, S], rows in order; see
    docs/data_format.md), none for a batch without them (text rows only), None for a model without
    images. A model with images always gets a tensor, so its image encoder takes part in every step."""
    if vision is None or processing is None:
        return None
    if "pixels" not in batch:
        size = vision.image_size
        return torch.zeros(0, 3, size, size, device=batch["input_ids"].device)
    return normalize_pixels(batch["pixels"], processing)


def from_last_stage(engine: Any, world: ds.World, sums: dict[str, float]) -> dict[str, float]:
    """The last pipeline stage's sums (one rank per TP group counts), summed over replicas, on every rank."""
    reports = engine.is_last_stage() and world.tp_rank == 0
    return all_reduce_sums(sums if reports else dict.fromkeys(sums, 0.0), group=torch.distributed.group.WORLD)
