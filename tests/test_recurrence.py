"""CycleBlock semantics: which updates carry gradients in each grad mode, detached carries, gated injection."""

import pytest
import torch

from hrm_mega.models.block import BlockStack, SeqContext, attention_block
from hrm_mega.models.layers import init_parameters
from hrm_mega.models.recurrence import Carry, CycleBlock

HIDDEN, SEQ, BATCH = 16, 5, 3


def make_cycle(grad_mode: str, t: int = 3, injection: str = "add", shared: bool = False, seed: int = 0):
    """A CycleBlock with T = t; the number of H cycles N is an argument of each call."""

    def stack():
        return BlockStack([attention_block(HIDDEN, 2, 32, norm_placement="post", norm_weight="none")])

    cycle = CycleBlock(
        stack(), None if shared else stack(), hidden_size=HIDDEN, l_cycles=t, grad_mode=grad_mode,
        injection=injection,
    )  # fmt: skip
    init_parameters(cycle, seed)
    return cycle


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=g, requires_grad=True)
    carry = Carry(torch.randn(BATCH, SEQ, HIDDEN, generator=g), torch.randn(BATCH, SEQ, HIDDEN, generator=g))
    return x, carry


def grads_of(module: torch.nn.Module, x: torch.Tensor, z_H: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad()
    x.grad = None
    z_H.square().mean().backward()
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    out["x"] = x.grad.clone()
    return out


def hand_unrolled(
    cycle: CycleBlock, x: torch.Tensor, carry: Carry, cycles: int, differentiated
) -> torch.Tensor:
    """Reference: runs every update with autograd on, and cuts the graph by detaching the inputs of
    updates that must not be differentiated (a different mechanism from the no_grad regions in CycleBlock)."""
    ctx = SeqContext()
    z_H, z_L = carry.z_H, carry.z_L
    for n in range(cycles):
        for t in range(cycle.l_cycles):
            if differentiated(n, t):
                z_L = cycle.L(z_L, z_H + x, ctx)
            else:
                z_L = cycle.L(z_L.detach(), (z_H + x).detach(), ctx).detach()
        if differentiated(n, None):
            z_H = cycle.slow(z_H, z_L, ctx)
        else:
            z_H = cycle.slow(z_H.detach(), z_L.detach(), ctx).detach()
    return z_H


def assert_grads_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("n,t", [(2, 3), (3, 1), (1, 2)])
def test_one_step_matches_hand_unrolled_reference(n, t):
    cycle = make_cycle("one_step", t)
    x, carry = inputs()
    z_H, _ = cycle(x, carry, SeqContext(), n)
    got = grads_of(cycle, x, z_H)

    last = n - 1
    z_ref = hand_unrolled(cycle, x, carry, n, lambda i, j: i == last and (j is None or j == t - 1))
    want = grads_of(cycle, x, z_ref)
    torch.testing.assert_close(z_H, z_ref)
    assert_grads_equal(got, want)


def test_one_step_graph_holds_only_final_updates():
    """Only the final L and H updates are recorded: the graph reaches the carry through no earlier update."""
    cycle = make_cycle("one_step", t=3)
    x, carry = inputs()
    carry = Carry(carry.z_H.requires_grad_(), carry.z_L.requires_grad_())
    z_H, new_carry = cycle(x, carry, SeqContext(), 3)
    assert z_H.requires_grad
    assert not new_carry.z_H.requires_grad and not new_carry.z_L.requires_grad
    z_H.sum().backward()
    # The initial carry feeds only the first (no_grad) updates, so no gradient flows back to it.
    assert carry.z_H.grad is None and carry.z_L.grad is None
    # Both modules get gradients (from the final L and the final H update), and so does the input injection.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cycle.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_one_step_saved_activations_do_not_grow_with_cycles():
    def saved_bytes(n, t):
        cycle = make_cycle("one_step", t)
        x, carry = inputs()
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cycle(x, carry, SeqContext(), n)
        return total

    assert saved_bytes(1, 1) == saved_bytes(4, 8)


def test_last_cycle_differentiates_the_whole_last_h_cycle():
    n, t = 3, 2
    cycle = make_cycle("last_cycle", t)
    x, carry = inputs()
    z_H, new_carry = cycle(x, carry, SeqContext(), n)
    got = grads_of(cycle, x, z_H)
    z_ref = hand_unrolled(cycle, x, carry, n, lambda i, j: i == n - 1)
    assert_grads_equal(got, grads_of(cycle, x, z_ref))
    assert not new_carry.z_H.requires_grad

    # ...and differs from one_step, which drops the earlier L steps of that cycle.
    one = make_cycle("one_step", t)
    z1, _ = one(x, carry, SeqContext(), n)
    g1 = grads_of(one, x, z1)
    assert not torch.allclose(g1["x"], got["x"])


def test_full_backpropagates_through_every_update():
    n, t = 2, 2
    cycle = make_cycle("full", t)
    x, carry = inputs()
    carry = Carry(carry.z_H.requires_grad_(), carry.z_L.requires_grad_())
    z_H, new_carry = cycle(x, carry, SeqContext(), n)
    got = grads_of(cycle, x, z_H)
    z_ref = hand_unrolled(cycle, x, carry, n, lambda i, j: True)
    assert_grads_equal(got, grads_of(cycle, x, z_ref))
    assert carry.z_H.grad is not None  # gradient reaches the incoming carry only in full mode
    assert not new_carry.z_H.requires_grad

    last = make_cycle("last_cycle", t)
    zl, _ = last(x, carry, SeqContext(), n)
    assert not torch.allclose(grads_of(last, x, zl)["x"], got["x"])


def test_trm_shared_network_uses_one_module_for_both_updates():
    cycle = make_cycle("last_cycle", t=2, shared=True)
    assert cycle.H is None and cycle.slow is cycle.L
    names = {n.split(".")[0] for n, _ in cycle.named_parameters()}
    assert names == {"L"}
    x, carry = inputs()
    z_H, _ = cycle(x, carry, SeqContext(), 3)
    z_ref = hand_unrolled(cycle, x, carry, 3, lambda i, j: i == 2)
    torch.testing.assert_close(z_H, z_ref)


@pytest.mark.parametrize("n,t", [(1, 1), (3, 2)])
def test_gated_injection_with_zero_gates_equals_the_wrapped_layers(n, t):
    cycle = make_cycle("one_step", t, injection="gated")
    x, _ = inputs()
    zeros = Carry(torch.zeros(BATCH, SEQ, HIDDEN), torch.zeros(BATCH, SEQ, HIDDEN))
    z_H, _ = cycle(x, zeros, SeqContext(), n)
    plain = cycle.H(cycle.L(x, None, SeqContext()), None, SeqContext())
    torch.testing.assert_close(z_H, plain, rtol=1e-6, atol=1e-6)
    # The gates start at zero but still receive gradient, so training can open them.
    z_H.square().mean().backward()
    if n > 1:
        assert cycle.gate_LH.grad.abs().sum() > 0


def test_gated_injection_with_open_gates_is_not_the_plain_stack():
    cycle = make_cycle("full", 2, injection="gated")
    with torch.no_grad():
        cycle.gate_LH.fill_(0.5)
    x, _ = inputs()
    zeros = Carry(torch.zeros(BATCH, SEQ, HIDDEN), torch.zeros(BATCH, SEQ, HIDDEN))
    z_H, _ = cycle(x, zeros, SeqContext(), 2)
    plain = cycle.H(cycle.L(x, None, SeqContext()), None, SeqContext())
    assert not torch.allclose(z_H, plain, atol=1e-4)


def test_invalid_arguments_are_rejected():
    L = BlockStack([attention_block(HIDDEN, 2, 32)])
    with pytest.raises(ValueError, match="grad_mode"):
        CycleBlock(L, None, hidden_size=HIDDEN, l_cycles=1, grad_mode="two_step")
    with pytest.raises(ValueError, match="l_cycles=0"):
        CycleBlock(L, None, hidden_size=HIDDEN, l_cycles=0)
    x, carry = inputs()
    with pytest.raises(ValueError, match=r"cycles=0 \(H cycles\) must be >= 1"):
        CycleBlock(L, None, hidden_size=HIDDEN, l_cycles=1)(x, carry, SeqContext(), 0)


def test_cycles_are_an_argument_not_state():
    """The block holds no cycle count: each call runs the N it is given, whatever ran before."""
    cycle = make_cycle("full", t=1)
    x, carry = inputs()
    with torch.no_grad():
        reference = {n: cycle(x, carry, SeqContext(), n)[0] for n in (1, 3)}
        assert not torch.allclose(reference[1], reference[3])
        for n in (3, 1, 3):
            torch.testing.assert_close(cycle(x, carry, SeqContext(), n)[0], reference[n], rtol=0, atol=0)
    assert not hasattr(cycle, "h_cycles")
