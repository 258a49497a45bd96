"""Tests for hrm_mega.optim: AdamATan2, SparseSignSGD (single and 2-process gloo), the LR schedule, EMA."""

from __future__ import annotations

import io
import math
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import hrm_lr

from hrm_mega.optim import EMA, AdamATan2, LRSchedule, SparseSignSGD, lr_at

# --------------------------------------------------------------------------------------------------
# AdamATan2
# --------------------------------------------------------------------------------------------------


def _fma(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x*y + z rounded once, as CUDA's fma: fp32 inputs are exact in fp64, so one fp64 sum rounds once
    more (a double rounding that differs from fma in rare ties only)."""
    if x.dtype == torch.float64:
        return x * y + z
    return (x.double() * y.double() + z.double()).to(x.dtype)


def _package_adam_atan2(p0, grads, *, lr, betas, wd, decay_first=True):
    """adam-atan2 0.0.3 (the package HRM's and TRM's pretrain.py import), as its CUDA kernel runs it:
    csrc/adam_atan2.cu (FusedAdamMathFunctor, adam_math) and the pure-torch reference in its
    adam_atan2_test.py. Written here from that source, not from hrm_mega.optim.

    Per tensor and step t (a float32 counter): step_size = lr / (1 - b1^t), wd_alpha = 1 - lr*wd and
    sqrt(1 - b2^t) are computed in double and cast to the math type (fp32, fp64 for fp64 tensors).
    Per element, in the math type: p *= wd_alpha; m = lerp(m, g, 1-b1); v = lerp(v, g*g, 1-b2), the
    kernel's lerp being fma(w, end, fma(-w, start, start)); p -= step_size * atan2(m, sqrt(v) / sqrt(1-b2^t)).
    p, m and v are stored back in the parameter's dtype (the package's state is zeros_like(p)).

    decay_first=False moves the decay after the update: only to show the test can tell the two apart.
    """
    b1, b2 = betas
    store = p0.dtype
    math_dtype = torch.float64 if store == torch.float64 else torch.float32
    param, exp_avg, exp_avg_sq = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        t = float(torch.tensor(step, dtype=torch.float32))
        consts = (lr / (1 - b1**t), 1 - lr * wd, math.sqrt(1 - b2**t), 1 - b1, 1 - b2)
        step_size, wd_alpha, bc2_sqrt, w1, w2 = (torch.tensor(c, dtype=math_dtype) for c in consts)
        x, gm = param.to(math_dtype), g.to(math_dtype)
        m, v = exp_avg.to(math_dtype), exp_avg_sq.to(math_dtype)
        if decay_first:
            x = x * wd_alpha
        m = _fma(w1.expand_as(m), gm, _fma(-w1.expand_as(m), m, m))
        v = _fma(w2.expand_as(v), gm * gm, _fma(-w2.expand_as(v), v, v))
        x = x - step_size * torch.atan2(m, v.sqrt() / bc2_sqrt)
        if not decay_first:
            x = x * wd_alpha
        param, exp_avg, exp_avg_sq = x.to(store), m.to(store), v.to(store)
    return param, exp_avg, exp_avg_sq


def _grad_sequence(n: int, steps: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Gradients over six decades of scale, with sign flips; every 97th weight always gets 0."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-5, 1, n, dtype=torch.float64)
    grads = []
    for _ in range(steps):
        g = torch.randn(n, generator=gen, dtype=torch.float64) * scale
        g[::97] = 0.0
        grads.append(g.to(dtype))
    return grads


def _run_ours(p0, grads, **kwargs):
    p = torch.nn.Parameter(p0.clone())
    opt = AdamATan2([p], **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]


STEPS = 25


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_adam_atan2_defaults_match_the_adam_atan2_package(dtype):
    # HRM's Sudoku recipe: lr 1e-4, wd 1.0, betas (0.9, 0.95); and a larger lr so that the decay order and
    # the update scale move the weights well above the tolerance.
    gen = torch.Generator().manual_seed(0)
    p0 = (torch.randn(1000, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    grads = _grad_sequence(1000, STEPS, dtype, seed=1)
    # Both compute the same formula; they differ only in rounding order. Ours computes b1*m + (1-b1)*g and
    # multiplies by 1/sqrt(1-b2^t) where the kernel lerps with fma and divides: in fp32 a few ulps a step
    # (|p| < 2.5: ulp 2.4e-7; measured 3e-7 after 25 steps), in fp64 ~1e-16 (measured 2e-16). m and v
    # are sums of terms no larger than max_t |g_t| (its square for v): relative to that, each step
    # rounds by ~1 ulp (measured 7e-8 in fp32, 1e-16 in fp64). Weights whose gradient is always 0 must
    # not move but for the decay, identically (atan2(0, 0) = 0 in both).
    fp32 = dtype == torch.float32
    atol_p, rel_mv = (2e-6, 1e-6) if fp32 else (1e-13, 1e-14)
    gmax = torch.stack(grads).abs().amax(0)
    for lr, wd in ((1e-4, 1.0), (1e-2, 1.0), (3e-2, 0.1)):
        hp = dict(lr=lr, betas=(0.9, 0.95))
        p, state = _run_ours(p0, grads, weight_decay=wd, **hp)
        want_p, want_m, want_v = _package_adam_atan2(p0, grads, wd=wd, **hp)
        assert state["step"] == STEPS and state["exp_avg"].dtype == dtype
        torch.testing.assert_close(p, want_p, rtol=0, atol=atol_p)
        assert ((state["exp_avg"] - want_m).abs() <= rel_mv * gmax).all()
        assert ((state["exp_avg_sq"] - want_v).abs() <= rel_mv * gmax**2).all()
        if lr >= 1e-2:
            # The test can fail: the 1.27 scale and decay-after-update both miss the package by far more.
            scaled, _ = _run_ours(p0, grads, weight_decay=wd, a=1.27, **hp)
            assert (scaled - want_p).abs().max() > 1000 * atol_p
            late_p, _, _ = _package_adam_atan2(p0, grads, wd=wd, decay_first=False, **hp)
            assert (late_p - want_p).abs().max() > 100 * atol_p


def test_adam_atan2_bf16_parameters_match_the_package_within_rounding():
    """bf16 parameters and gradients, against the package as it runs them: its moments are zeros_like(p),
    so bf16, and p, m and v are rounded to bf16 after every step; ours keeps m and v in fp32 and rounds
    only p. Both round p to bf16 every step, so an update near half a bf16 ulp moves a weight by one ulp
    in one and not the other, step after step: a per-weight bound is only STEPS ulps. The tolerance is
    therefore on the whole tensor: ours stays much closer to the package than bf16 storage itself puts
    the package from the same run in fp32 (mean 1.5e-5 against 1e-4 measured), most weights agree to the
    bit, and the 1.27 scale lands an order of magnitude further away."""
    gen = torch.Generator().manual_seed(2)
    n, lr, wd = 4096, 1e-3, 0.1  # as the package's own test: std 0.02 weights, lr 1e-3, wd 0.1
    p0 = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    grads = [(torch.randn(n, generator=gen) * 1e-3).to(torch.bfloat16) for _ in range(STEPS)]
    hp = dict(lr=lr, betas=(0.9, 0.95))
    p, state = _run_ours(p0, grads, weight_decay=wd, **hp)
    want_p, want_m, _ = _package_adam_atan2(p0, grads, wd=wd, **hp)
    fp32_p, _, _ = _package_adam_atan2(p0.float(), [g.float() for g in grads], wd=wd, **hp)
    assert p.dtype == torch.bfloat16 and state["exp_avg"].dtype == torch.float32
    assert want_m.dtype == torch.bfloat16
    assert (p.float() - p0.float()).abs().mean() > 2e-3  # 25 steps of ~lr*atan2: the weights moved

    err = (p.float() - want_p.float()).abs()
    storage_err = (want_p.float() - fp32_p).abs().mean()
    assert err.mean() < 0.25 * storage_err, (err.mean(), storage_err)
    assert (err == 0).float().mean() > 0.7
    ulp = torch.finfo(torch.bfloat16).eps * want_p.float().abs().max()
    assert err.max() <= STEPS * ulp
    scaled, _ = _run_ours(p0, grads, weight_decay=wd, a=1.27, **hp)
    assert (scaled.float() - want_p.float()).abs().mean() > 5 * storage_err


def test_adam_atan2_a_and_b_options():
    """a and b away from the package's 1: a scales the update, so (lr, wd, a) equals the package at
    (lr*a, wd/a). The first step has m = (1-b1)*g and sqrt(v/(1-b2)) = |g|; the package corrects m's bias
    outside atan2, so the step is lr/(1-b1) * a * atan2((1-b1)*g, b*|g|) = lr*a*atan((1-b1)/b)/(1-b1)
    * sign(g), whatever |g|."""
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(500, generator=gen, dtype=torch.float64)
    grads = _grad_sequence(500, STEPS, torch.float64, seed=4)
    lr, wd, betas = 1e-2, 0.5, (0.8, 0.9)
    p, _ = _run_ours(p0, grads, lr=lr, betas=betas, weight_decay=wd, a=1.27)
    want, _, _ = _package_adam_atan2(p0, grads, lr=lr * 1.27, betas=betas, wd=wd / 1.27)
    torch.testing.assert_close(p, want, rtol=0, atol=1e-13)

    g = torch.tensor([0.3, -7.0, 1e-6, -1e-4], dtype=torch.float64)
    for a, b in ((1.0, 1.0), (1.27, 1.0), (0.5, 2.0)):
        x = torch.tensor([0.5, -1.25, 2.0, 0.0], dtype=torch.float64)
        p1, _ = _run_ours(x, [g], lr=lr, betas=betas, weight_decay=wd, a=a, b=b)
        want1 = x * (1 - lr * wd) - lr * a * math.atan((1 - betas[0]) / b) / (1 - betas[0]) * g.sign()
        torch.testing.assert_close(p1, want1, rtol=0, atol=1e-15)


def test_adam_atan2_tensor_lr_equals_float_lr():
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(64, generator=gen)
    grads = _grad_sequence(64, 5, torch.float32, seed=6)
    p_float, _ = _run_ours(p0, grads, lr=0.03, weight_decay=0.1)
    p_tensor, _ = _run_ours(p0, grads, lr=torch.tensor(0.03), weight_decay=0.1)
    torch.testing.assert_close(p_tensor, p_float, rtol=1e-6, atol=1e-7)


def test_adam_atan2_bf16_params_keep_fp32_state():
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(64, generator=gen).to(torch.bfloat16)
    grad = torch.randn(64, generator=gen)
    p16 = torch.nn.Parameter(init.clone())
    p32 = torch.nn.Parameter(init.float())
    opt16 = AdamATan2([p16], lr=0.01, weight_decay=0.1)
    opt32 = AdamATan2([p32], lr=0.01, weight_decay=0.1)
    p16.grad, p32.grad = grad.to(torch.bfloat16), grad.to(torch.bfloat16).float()
    opt16.step()
    opt32.step()
    assert p16.dtype == torch.bfloat16
    assert opt16.state[p16]["exp_avg"].dtype == torch.float32
    assert opt16.state[p16]["exp_avg_sq"].dtype == torch.float32
    # One step computed in fp32 and rounded once to bf16.
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))
    assert not torch.equal(p16.detach(), init)

    # torch casts state to the param dtype on load; AdamATan2 must keep it fp32.
    sd = opt16.state_dict()
    opt_loaded = AdamATan2([p16], lr=0.01, weight_decay=0.1)
    opt_loaded.load_state_dict(sd)
    assert opt_loaded.state[p16]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt_loaded.state[p16]["exp_avg_sq"], opt16.state[p16]["exp_avg_sq"])


def _tiny_model(seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _train(model, opt, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adam_atan2_state_dict_round_trip_continues_identically():
    model_a = _tiny_model(1)
    opt_a = AdamATan2(
        [
            {"params": model_a[0].parameters()},
            {"params": model_a[2].parameters(), "weight_decay": 0.0, "lr": 3e-3},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )
    _train(model_a, opt_a, steps=3, seed=10)

    # Save through bytes with weights_only=True, as a checkpoint would.
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_b = _tiny_model(99)  # different init: everything must come from the checkpoint
    model_b.load_state_dict(ckpt["model"])
    opt_b = AdamATan2(
        [{"params": model_b[0].parameters()}, {"params": model_b[2].parameters()}], lr=0.5, weight_decay=0.0
    )
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.param_groups[1]["lr"] == 3e-3 and opt_b.param_groups[0]["weight_decay"] == 0.1

    losses_a = _train(model_a, opt_a, steps=4, seed=20)
    losses_b = _train(model_b, opt_b, steps=4, seed=20)
    assert losses_a == losses_b
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
        assert opt_b.state[pb]["step"] == 7
        assert torch.equal(opt_a.state[pa]["exp_avg"], opt_b.state[pb]["exp_avg"])


def test_adam_atan2_reduces_quadratic_loss():
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(32, generator=gen)
    scales = torch.logspace(-2, 1, 32)  # badly conditioned, which Adam-style scaling should shrug off
    p = torch.nn.Parameter(torch.zeros(32))
    opt = AdamATan2([p], lr=0.05)

    def loss_fn() -> torch.Tensor:
        return (scales * (p - target) ** 2).sum()

    first = loss_fn().item()
    for _ in range(300):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 1e-3 * first


def _run_many(p0s, grads, **kwargs):
    """AdamATan2 over several parameters at once; grads[i][t] is parameter i's gradient at step t."""
    ps = [torch.nn.Parameter(p0.clone()) for p0 in p0s]
    opt = AdamATan2(ps, **kwargs)
    for t in range(len(grads[0])):
        for p, g in zip(ps, grads):
            p.grad = g[t].clone()
        opt.step()
    return [p.detach() for p in ps]


def test_adam_atan2_compiled_update_matches_the_package():
    """compile=True (one compiled kernel per tensor) against the package's transcription, on tensors of
    several sizes (one element, one chunk and more), a non-contiguous one (the eager slice path) and a
    bf16 one (updated in fp32), with a tensor lr; and within a few ulps of the eager update."""
    gen = torch.Generator().manual_seed(7)
    sizes = (1, 1000, 300_000)
    p0s = [torch.randn(n, generator=gen) * 0.5 for n in sizes]
    grads = [_grad_sequence(n, 6, torch.float32, seed=8 + i) for i, n in enumerate(sizes)]
    wide = torch.randn(40, 30, generator=gen)
    wide_grads = [torch.randn(40, 30, generator=gen) for _ in range(6)]
    hp = dict(lr=1e-2, betas=(0.9, 0.95))
    compiled = _run_many([*p0s, wide.t()], [*grads, [g.t() for g in wide_grads]], weight_decay=0.5,
                         compile=True, **{**hp, "lr": torch.tensor(1e-2)})  # fmt: skip
    eager = _run_many([*p0s, wide.t()], [*grads, [g.t() for g in wide_grads]], weight_decay=0.5, **hp)
    assert not compiled[-1].is_contiguous()
    for got, ref, p0, gs in zip(compiled, eager, [*p0s, wide.t()], [*grads, [g.t() for g in wide_grads]]):
        want, _, _ = _package_adam_atan2(p0, gs, wd=0.5, **hp)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        assert (got - p0).abs().max() > 1e-3  # six steps of ~lr: the weights moved

    # a = 1.27 scales the update: (lr, wd, a) is the package at (lr*a, wd/a).
    x0, xg = p0s[1], grads[1]
    (scaled,) = _run_many([x0], [xg], weight_decay=0.5, a=1.27, compile=True, **hp)
    want, _, _ = _package_adam_atan2(x0, xg, lr=1e-2 * 1.27, betas=hp["betas"], wd=0.5 / 1.27)
    torch.testing.assert_close(scaled, want, rtol=0, atol=2e-6)

    # bf16: computed in fp32 and rounded once per step, as the eager path does.
    b0 = (torch.randn(4096, generator=gen) * 0.02).to(torch.bfloat16)
    bg = [(torch.randn(4096, generator=gen) * 1e-3).to(torch.bfloat16) for _ in range(6)]
    (b_compiled,) = _run_many([b0], [bg], weight_decay=0.1, compile=True, lr=1e-3)
    (b_eager,) = _run_many([b0], [bg], weight_decay=0.1, lr=1e-3)
    assert b_compiled.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * b_eager.float().abs().max()
    assert ((b_compiled.float() - b_eager.float()).abs() <= ulp).all()
    assert (b_compiled == b_eager).float().mean() > 0.99


def test_adam_atan2_foreach_update_equals_the_sliced_update():
    """The multi-tensor update (what non-CPU devices run) is the same operations as the CPU slices."""
    from hrm_mega.optim.adam_atan2 import _update_foreach, _update_slice

    gen = torch.Generator().manual_seed(9)
    shapes = [(7,), (300, 20), (1,)]
    quads = [tuple(torch.randn(s, generator=gen).abs() if i == 3 else torch.randn(s, generator=gen)
                   for i in range(4)) for s in shapes]  # fmt: skip
    copies = [tuple(x.clone() for x in q) for q in quads]
    before = [q[0].clone() for q in quads]
    coefficients = (0.9, 0.95, 1.3, 0.02, 0.999)
    _update_foreach(quads, *coefficients)
    for q in copies:
        _update_slice(*q, *coefficients)
    for q, c in zip(quads, copies):
        for got, want in zip(q, c):
            assert torch.equal(got, want)
    assert all(not torch.equal(q[0], b) for q, b in zip(quads, before))  # the parameters moved


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": torch.ones(2)}, "lr"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"a": 0.0}, "a must"),
        ({"b": -1.0}, "b must"),
    ],
)
def test_adam_atan2_rejects_bad_hyperparameters(kwargs, field):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=field):
        AdamATan2([p], **kwargs)


def test_adam_atan2_rejects_bad_param_group_override():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="weight_decay"):
        AdamATan2([{"params": [p]}, {"params": [q], "weight_decay": -1.0}])


# --------------------------------------------------------------------------------------------------
# SparseSignSGD
# --------------------------------------------------------------------------------------------------


def _table(num_ids: int = 10, dim: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_ids, dim, generator=torch.Generator().manual_seed(seed))


def test_sparse_sign_sgd_touches_only_batch_rows_and_sums_duplicates():
    table = _table()
    before = table.clone()
    lr, wd = 0.1, 0.5
    opt = SparseSignSGD(table, lr=lr, weight_decay=wd)
    ids = torch.tensor([2, 7, 2, 2])
    # Row 2 appears three times. Column 0: +1 -3 +1 = -1 (per-sample signs would sum to +1).
    # Column 1: 2 -1 -1 = 0 -> no sign step, only decay. Column 2: all negative.
    grads = torch.tensor(
        [[1.0, 2.0, -1.0], [0.5, -0.5, 0.0], [-3.0, -1.0, -2.0], [1.0, -1.0, -0.1]],
    )
    opt.step(ids, grads)

    decay = 1 - lr * wd
    want2 = before[2] * decay - lr * torch.tensor([-1.0, 0.0, -1.0])
    want7 = before[7] * decay - lr * torch.tensor([1.0, -1.0, 0.0])
    torch.testing.assert_close(table[2], want2, rtol=0, atol=1e-7)
    torch.testing.assert_close(table[7], want7, rtol=0, atol=1e-7)
    untouched = [i for i in range(10) if i not in (2, 7)]
    assert torch.equal(table[untouched], before[untouched])  # bit-identical, not even decayed


def test_sparse_sign_sgd_lr_override_and_state_dict():
    table = _table()
    before = table.clone()
    opt = SparseSignSGD(table, lr=1.0, weight_decay=0.0)
    opt.step(torch.tensor([4]), torch.tensor([[1.0, -1.0, 2.0]]), lr=0.25)
    torch.testing.assert_close(table[4], before[4] - 0.25 * torch.tensor([1.0, -1.0, 1.0]))
    assert opt.lr == 1.0  # the per-call override does not stick

    opt.lr = 0.5
    sd = opt.state_dict()
    other = SparseSignSGD(_table(), lr=9.0, weight_decay=9.0)
    other.load_state_dict(sd)
    assert (other.lr, other.weight_decay) == (0.5, 0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        other.load_state_dict({"lr": 0.1})


def test_sparse_sign_sgd_bad_inputs():
    opt = SparseSignSGD(_table(), lr=0.1)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        opt.step(torch.tensor([3, 10]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="grads must have shape"):
        opt.step(torch.tensor([3, 4]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ids must be a 1-D integer tensor"):
        opt.step(torch.tensor([3.0]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="table must be a 2-D floating tensor"):
        SparseSignSGD(torch.zeros(10), lr=0.1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        SparseSignSGD(_table(), lr=-0.1)


# Two data-parallel steps; the second has a different n on each rank (a short last batch).
_RANK_BATCHES = {
    0: [torch.tensor([0, 3, 3, 5]), torch.tensor([1, 1])],
    1: [torch.tensor([3, 7, 0, 9]), torch.tensor([8, 1, 2])],
}


def _rank_grads(rank: int, step: int, n: int) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(100 * rank + step))


def _sign_sgd_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    try:
        table = _table()
        opt = SparseSignSGD(table, lr=0.1, weight_decay=0.2)  # group=None -> default group
        for step, ids in enumerate(_RANK_BATCHES[rank]):
            opt.step(ids, _rank_grads(rank, step, ids.numel()))
        torch.save(table, f"{out_dir}/table{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_sparse_sign_sgd_two_gloo_ranks_match_single_process(tmp_path):
    ctx = mp.spawn(_sign_sgd_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=0.2):  # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("gloo workers did not finish within 90 s")
    tables = [torch.load(tmp_path / f"table{r}.pt", weights_only=True) for r in range(2)]

    # Single process on the concatenated (rank-ordered) batches.
    table = _table()
    before = table.clone()
    opt = SparseSignSGD(table, lr=0.1, weight_decay=0.2)
    for step in range(2):
        ids = torch.cat([_RANK_BATCHES[r][step] for r in range(2)])
        grads = torch.cat([_rank_grads(r, step, _RANK_BATCHES[r][step].numel()) for r in range(2)])
        opt.step(ids, grads)

    assert torch.equal(tables[0], tables[1])
    assert torch.equal(tables[0], table)
    # Rows used only by the other rank were updated too (the gather happened); unused rows untouched.
    assert not torch.equal(table[9], before[9]) and not torch.equal(table[8], before[8])
    assert torch.equal(table[[4, 6]], before[[4, 6]])


# --------------------------------------------------------------------------------------------------
# LR schedule
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "warmup, total, min_ratio",
    [(100, 1100, 0.1), (0, 10, 0.0), (3, 10, 1.0), (5, 5, 0.0), (20, 8, 0.5), (1, 2, 0.0)],
)
def test_lr_at_is_hrms_schedule_at_every_update(warmup, total, min_ratio):
    kw = dict(base_lr=1e-3, warmup_steps=warmup, total_steps=total, min_ratio=min_ratio)
    for step in range(1, total + 1):
        assert lr_at(step, **kw) == pytest.approx(
            hrm_lr(step, 1e-3, warmup, total, min_ratio), rel=1e-12, abs=0
        )
    assert LRSchedule(**kw)(total) == lr_at(total, **kw)


def test_lr_at_key_points():
    kw = dict(base_lr=1e-3, warmup_steps=100, total_steps=1100, min_ratio=0.1)
    assert lr_at(1, **kw) == pytest.approx(1e-5)  # the first update already moves
    assert lr_at(50, **kw) == pytest.approx(5e-4)
    assert lr_at(100, **kw) == pytest.approx(1e-3)
    assert lr_at(600, **kw) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway through the cosine
    assert lr_at(1100, **kw) == pytest.approx(1e-4)  # the last update is at the floor
    assert lr_at(5000, **kw) == pytest.approx(1e-4)
    lrs = [lr_at(s, **kw) for s in range(100, 1101)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # monotone decay
    # No warmup: the first update is at base_lr; min_ratio=1 is a constant LR.
    assert lr_at(1, base_lr=2.0, warmup_steps=0, total_steps=10, min_ratio=1.0) == 2.0
    assert lr_at(7, base_lr=2.0, warmup_steps=0, total_steps=10, min_ratio=1.0) == 2.0
    # warmup >= total: the whole run is warmup, as in HRM.
    assert lr_at(8, base_lr=1.0, warmup_steps=20, total_steps=8, min_ratio=0.0) == pytest.approx(0.4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(step=-1), "step"),
        (dict(base_lr=-1.0), "base_lr"),
        (dict(warmup_steps=-5), "warmup_steps"),
        (dict(total_steps=0), "total_steps"),
        (dict(min_ratio=1.5), "min_ratio"),
        (dict(min_ratio=-0.1), "min_ratio"),
    ],
)
def test_lr_at_rejects_bad_arguments(kwargs, field):
    args = dict(step=0, base_lr=1e-3, warmup_steps=10, total_steps=100, min_ratio=0.1) | kwargs
    step = args.pop("step")
    with pytest.raises(ValueError, match=field):
        lr_at(step, **args)


def test_lr_schedule_validates_on_construction():
    with pytest.raises(ValueError, match="total_steps"):
        LRSchedule(base_lr=1e-3, total_steps=0, warmup_steps=5)


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------


def test_ema_update_math_and_trainable_only():
    model = _tiny_model(5)
    model[2].bias.requires_grad_(False)
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias", "2.weight"}
    w0 = model[0].weight.detach().clone()

    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.9 * (0.9 * w0 + 0.1 * (w0 + 1.0)) + 0.1 * (w0 + 2.0))
    torch.testing.assert_close(ema.shadow["0.bias"], model[0].bias.detach())  # unchanged params: fixed point

    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
    with pytest.raises(ValueError, match="parameters differ"):
        ema.update(_tiny_model(5))  # all params trainable: 2.bias is new


def test_ema_bf16_model_keeps_fp32_shadows():
    model = _tiny_model(6).to(torch.bfloat16)
    ema = EMA(model, decay=0.99)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    ema.update(model)
    ema.copy_to(model)
    assert model[0].weight.dtype == torch.bfloat16


def test_ema_swapped_restores_weights_and_state_dict_round_trip():
    model = _tiny_model(7)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.update(model)
    originals = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    with ema.swapped(model):
        for p, name in zip(model.parameters(), ema.shadow):
            assert torch.equal(p.detach(), ema.shadow[name])
        ema_out = model(x)
    for p, orig in zip(model.parameters(), originals):
        assert torch.equal(p.detach(), orig)
    assert not torch.allclose(ema_out, model(x))

    # Restored even when the body raises.
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(model):
        raise RuntimeError("boom")
    for p, orig in zip(model.parameters(), originals):
        assert torch.equal(p.detach(), orig)

    other = EMA(_tiny_model(8), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(ValueError, match="parameter names differ"):
        EMA(torch.nn.Linear(2, 2)).load_state_dict(ema.state_dict())
