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


def _reference_adam_atan2(p0, grads, *, lr, betas, wd, a, b):
    """The update rule written out with python floats, one element at a time."""
    b1, b2 = betas
    p, m, v = list(p0), [0.0] * len(p0), [0.0] * len(p0)
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            p[i] *= 1 - lr * wd
            p[i] -= lr / (1 - b1**t) * a * math.atan2(m[i], b * math.sqrt(v[i]) / math.sqrt(1 - b2**t))
    return p, m, v


P0 = [0.5, -1.25, 2.0, 0.0]
GRADS = [[0.3, -0.7, 1e-3, 0.0], [-0.2, -0.4, 5.0, 2.0], [0.9, 0.1, -3.0, -0.5]]


@pytest.mark.parametrize(
    "kwargs, a, b",
    [({"a": 1.0, "b": 1.0}, 1.0, 1.0), ({}, 1.27, 1.0), ({"a": 0.5, "b": 2.0}, 0.5, 2.0)],
    ids=["a1b1", "defaults", "a0.5b2"],
)
def test_adam_atan2_matches_hand_computed_steps(kwargs, a, b):
    lr, betas, wd = 0.1, (0.8, 0.9), 0.05
    p = torch.nn.Parameter(torch.tensor(P0, dtype=torch.float64))
    opt = AdamATan2([p], lr=lr, betas=betas, weight_decay=wd, **kwargs)
    for g in GRADS:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    want_p, want_m, want_v = _reference_adam_atan2(P0, GRADS, lr=lr, betas=betas, wd=wd, a=a, b=b)
    state = opt.state[p]
    assert state["step"] == 3
    torch.testing.assert_close(p.detach(), torch.tensor(want_p, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        state["exp_avg"], torch.tensor(want_m, dtype=torch.float64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        state["exp_avg_sq"], torch.tensor(want_v, dtype=torch.float64), rtol=1e-12, atol=0
    )
    # The update really moved the weights (a wrong sign or a skipped step would not match the reference).
    assert not torch.allclose(p.detach(), torch.tensor(P0, dtype=torch.float64))


def test_adam_atan2_fp32_and_tensor_lr():
    lr, betas, wd = 0.03, (0.9, 0.95), 0.1
    results = []
    for lr_arg in (lr, torch.tensor(lr)):
        p = torch.nn.Parameter(torch.tensor(P0, dtype=torch.float32))
        opt = AdamATan2([p], lr=lr_arg, betas=betas, weight_decay=wd)
        for g in GRADS:
            p.grad = torch.tensor(g, dtype=torch.float32)
            opt.step()
        results.append(p.detach().clone())
    want, _, _ = _reference_adam_atan2(P0, GRADS, lr=lr, betas=betas, wd=wd, a=1.27, b=1.0)
    torch.testing.assert_close(results[0], torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


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
