"""The vocabulary under tensor parallelism: embedding, LM-head logits and cross-entropy.

With parallel.tp = T > 1 each rank holds V/T consecutive rows of the embedding (and of an untied LM
head), and logits stay split over the vocabulary: rank r holds logits[..., r*V/T : (r+1)*V/T]. The
cross-entropy never gathers them. For a normaliser f (softmax: exp(x - max); stablemax: s(x) = x + 1
for x >= 0, 1 / (1 - x) below)

    log p(y) = log f(x_y) - log sum_v f(x_v)

needs two numbers per token from every rank: its partial sum of f, and f(x_y) if y is in its range
(0 otherwise). Both are summed over the TP group by megatron-core's reduce region, whose backward is
the identity: every rank then computes the same loss, and each one's gradient reaches exactly its own
logits. At T = 1 everything here is the plain single-process operation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrm_mega import distributed

IGNORE_LABEL = -100


def vocab_embedding(vocab_size: int, hidden_size: int) -> nn.Module:
    """nn.Embedding, or megatron-core's VocabParallelEmbedding (rows split over TP ranks; the weight is
    still called `weight`). Initialisation is left to init_parameters."""
    if distributed.tp_size() == 1:
        return nn.Embedding(vocab_size, hidden_size)
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    from hrm_mega.models.layers import mark_split, megatron_parallel_config, skip_init

    embedding = VocabParallelEmbedding(
        vocab_size, hidden_size, init_method=skip_init, config=megatron_parallel_config()
    )
    mark_split(embedding.weight, dim=0)
    return embedding


def tied_logits(hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
    """hidden [..., h] @ this rank's embedding rows^T -> this rank's vocabulary slice of the logits. Under
    TP the input passes a copy region, so its gradient is summed over the ranks' slices."""
    if distributed.tp_size() > 1:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        hidden = copy_to_tensor_model_parallel_region(hidden)
    return F.linear(hidden, embedding_weight)


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from every rank's slice. Identity at TP=1. Differentiable for a loss that
    every TP rank computes alike from the whole vocabulary (RL's log-probs): the backward hands each rank
    the gradient of its own slice, as megatron-core's gather region does (which allocates on CUDA)."""
    if distributed.tp_size() == 1:
        return logits
    return _GatherVocab.apply(logits)


class _GatherVocab(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor) -> torch.Tensor:
        group = distributed.tensor_parallel_group()
        slices = [torch.empty_like(logits) for _ in range(distributed.tp_size())]
        torch.distributed.all_gather(slices, logits.contiguous(), group=group)
        return torch.cat(slices, dim=-1)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad.chunk(distributed.tp_size(), dim=-1)[distributed.tp_rank()].contiguous()


@torch.no_grad()
def label_is_argmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per token, whether labels is the most likely token (what greedy decoding would emit; a tie
    counts as a hit), without gathering the vocabulary: the label's logit against the maximum over
    every rank's slice. logits [..., V/T], labels [...]; False where labels == IGNORE_LABEL."""
    valid = labels != IGNORE_LABEL
    shard = logits.shape[-1]
    local = torch.where(valid, labels, 0) - distributed.tp_rank() * shard
    mine = (local >= 0) & (local < shard)
    picked = logits.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1).float()
    target = torch.where(mine, picked, torch.finfo(torch.float32).min)
    best = logits.max(dim=-1).values.float()
    if distributed.tp_size() > 1:
        group = distributed.tensor_parallel_group()
        torch.distributed.all_reduce(target, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=group)
    return valid & (target >= best)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """Per-token -log p(label) with the same shape as labels, 0 where labels == IGNORE_LABEL.

    logits [..., V/T] are this rank's slice. kind: softmax (in fp32) or stablemax (in fp64, as HRM).
    """
    if kind not in ("softmax", "stablemax"):
        raise ValueError(f"loss={kind!r} must be stablemax or softmax")
    valid = labels != IGNORE_LABEL
    safe = torch.where(valid, labels, 0)
    if distributed.tp_size() > 1:
        loss = _vocab_parallel_cross_entropy(logits, safe, kind)
    elif kind == "stablemax":
        loss = -log_stablemax(logits.double()).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    else:
        loss = F.cross_entropy(logits.float().flatten(0, -2), safe.flatten(), reduction="none")
        loss = loss.view(labels.shape)
    return torch.where(valid, loss, 0).float()


# Logits per chunk of linear_cross_entropy: 4M fp32 values (16 MB) stay in cache-sized reused blocks.
CE_CHUNK_LOGITS = 1 << 22


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over labelled rows of -log softmax(hidden @ weight^T)[label], without the [n, V] logits.

    hidden [..., h], weight [V, h] (the LM head), labels [...] with IGNORE_LABEL for rows without one.
    Equals cross_entropy(F.linear(hidden, weight), labels).sum() (the logits in fp32, as there), at TP = 1.
    The rows go in chunks of about CE_CHUNK_LOGITS logits; since the result is a plain sum, its gradient
    with respect to a chunk's logits is softmax - onehot(label), known in forward: each chunk's logits
    become their gradient in place and pass straight into the two matmuls of the head's backward. The
    full logits (and their gradient) never exist: at vocabulary 8192 and 4096 rows that is 2 x 128 MB
    not written, and at Gemma 3's 262,144 the difference between fitting and not."""
    if distributed.tp_size() > 1:
        raise ValueError(
            "linear_cross_entropy runs at parallel.tp=1; under TP use cross_entropy on the logits"
        )
    rows = max(1, CE_CHUNK_LOGITS // weight.shape[0])
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, labels.flatten(), rows, grads)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        rows: int,
        grads: bool,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else None
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], labels[start : start + rows]
            valid = (y != IGNORE_LABEL).unsqueeze(1)
            safe = torch.where(valid, y.unsqueeze(1), 0)
            # -log softmax(z)[y] = log sum exp(z - max) - (z[y] - max), with one exp per logit, in place
            shifted = F.linear(h, weight).float()  # [rows, V]
            shifted = shifted.sub_(shifted.amax(-1, keepdim=True))
            picked = shifted.gather(1, safe)
            exp = shifted.exp_()
            sum_exp = exp.sum(-1, keepdim=True)
            total += (sum_exp.log() - picked).masked_fill_(~valid, 0).sum()
            if grads:  # softmax - onehot on labelled rows, zero on the others
                d_logits = exp.mul_(valid / sum_exp).scatter_add_(1, safe, -valid.float())
                d_logits = d_logits.to(hidden.dtype)
                torch.mm(d_logits, weight, out=grad_hidden[start : start + rows])
                if weight.dtype == torch.float32:
                    grad_weight.addmm_(d_logits.t(), h)
                else:  # accumulate the chunks in fp32, as one matmul over all rows would
                    grad_weight += (d_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ):  # -> (hidden, weight, None x3)
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad.to(grad_hidden.dtype),
            (grad_weight * grad).to(ctx.weight_dtype),
            None,
            None,
            None,
        )


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log of stablemax: s(x) / sum s(x), with s(x) = x + 1 for x >= 0 and 1 / (1 - x) below."""
    s = _stablemax_numerator(x)
    return torch.log(s / s.sum(dim=dim, keepdim=True))


def _stablemax_numerator(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, 1 / (1 - x + 1e-30), x + 1)


def _vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    from megatron.core.tensor_parallel import (
        reduce_from_tensor_model_parallel_region,
        vocab_parallel_cross_entropy,
    )

    if kind == "softmax":  # megatron-core's: max, sum and target with one custom backward; it works in place
        return vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), labels)
    shard = logits.shape[-1]
    local = labels - distributed.tp_rank() * shard
    mine = (local >= 0) & (local < shard)
    s = _stablemax_numerator(logits.double())
    total = reduce_from_tensor_model_parallel_region(s.sum(-1))
    picked = s.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    target = reduce_from_tensor_model_parallel_region(torch.where(mine, picked, 0))
    return total.log() - target.log()


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-token KL(softmax(teacher) || softmax(student)) over the whole vocabulary, from this rank's
    slices of both [..., V/T] (fp32); the gradient reaches the student's slice only. Distillation at a
    temperature divides both by it first.

    Under TP each rank holds p_t and log p_s for its slice once the maxima and the softmax sums are
    all-reduced (two collectives of two numbers per token), and the KL is the all-reduced sum of the
    slices' terms. Its gradient, p_s - p_t on the slice, is written by hand as megatron-core's
    vocab-parallel cross-entropy does: through an all-reduce whose backward is the identity, each rank
    would see only its own slice's share of d KL / d log Z_s (sum of p_t over its slice, not 1)."""
    return _VocabKL.apply(student, teacher)


class _VocabKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, student: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        tp = distributed.tp_size()
        group = distributed.tensor_parallel_group() if tp > 1 else None
        maxima = torch.stack((student.max(-1).values, teacher.max(-1).values))  # [2, ...]
        if tp > 1:
            torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=group)
        log_ps = student - maxima[0].unsqueeze(-1)
        log_pt = teacher - maxima[1].unsqueeze(-1)
        sums = torch.stack((log_ps.exp().sum(-1), log_pt.exp().sum(-1)))
        if tp > 1:
            torch.distributed.all_reduce(sums, group=group)
        log_ps -= sums[0].log().unsqueeze(-1)
        log_pt -= sums[1].log().unsqueeze(-1)
        p_t = log_pt.exp()
        kl = (p_t * (log_pt - log_ps)).sum(-1)
        if tp > 1:
            torch.distributed.all_reduce(kl, group=group)
        ctx.save_for_backward(log_ps.exp_().sub_(p_t))  # d KL / d student = p_s - p_t
        return kl

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (diff,) = ctx.saved_tensors
        return diff * grad.unsqueeze(-1), None
