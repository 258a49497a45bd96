"""Attention against a naive einsum-softmax implementation with masks built element by element here."""

import math

import pytest
import torch

from hrm_mega.models import attention
from hrm_mega.models.attention import Attention, DocumentRuns, attention_mask, flash_attn_func
from hrm_mega.models.layers import RotaryEmbedding, init_parameters

B, S, HIDDEN = 2, 9, 32


def allowed(i: int, j: int, causal: bool, window: int | None) -> bool:
    """May query position i see key position j?"""
    if causal and j > i:
        return False
    return window is None or abs(i - j) < window


def naive_mask(q_len: int, k_len: int, causal: bool, window: int | None) -> torch.Tensor:
    offset = k_len - q_len  # queries are the last q_len positions
    return torch.tensor(
        [[allowed(offset + i, j, causal, window) for j in range(k_len)] for i in range(q_len)]
    )


def naive_rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x: [b, s, h, d] rotated in the rotate-half convention, angles computed from scratch."""
    d = x.shape[-1]
    half = d // 2
    pos = torch.arange(x.shape[1], dtype=torch.float64).view(1, -1, 1, 1)
    theta = base ** (-2 * torch.arange(half, dtype=torch.float64) / d)
    c, s = torch.cos(pos * theta), torch.sin(pos * theta)
    a, b = x[..., :half].double(), x[..., half:].double()
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1).float()


def naive_attention(attn: Attention, x: torch.Tensor, mask: torch.Tensor | None, rope: bool) -> torch.Tensor:
    h, kv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = torch.einsum("bsi,oi->bso", x, attn.q_proj.weight).unflatten(-1, (h, d))  # [b, s, h, d]
    k = torch.einsum("bsi,oi->bso", x, attn.k_proj.weight).unflatten(-1, (kv, d))
    v = torch.einsum("bsi,oi->bso", x, attn.v_proj.weight).unflatten(-1, (kv, d))
    if attn.q_norm is not None:  # gemma form: x / rms(x) * (1 + w), per head
        eps = attn.q_norm.eps
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps) * (1 + attn.q_norm.weight)
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps) * (1 + attn.k_norm.weight)
    if rope:
        q, k = naive_rope(q), naive_rope(k)
    group = h // kv
    out = torch.zeros_like(q)
    for head in range(h):
        kv_head = head // group  # query heads [g*group, (g+1)*group) share kv head g
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv_head]) * attn.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out[:, :, head] = torch.einsum("bqk,bkd->bqd", scores.softmax(-1), v[:, :, kv_head])
    return torch.einsum("bsi,oi->bso", out.flatten(2), attn.o_proj.weight)


def make(num_heads=4, num_kv_heads=4, seed=0, **kwargs) -> Attention:
    attn = Attention(HIDDEN, num_heads, num_kv_heads, HIDDEN // num_heads, **kwargs)
    init_parameters(attn, seed)
    return attn


def inputs(seed=1) -> torch.Tensor:
    return torch.randn(B, S, HIDDEN, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["explicit", "sdpa"])
def kernel(request, monkeypatch) -> str:
    """Both CPU kernels for unpacked rows: explicit_attention takes rows of up to EXPLICIT_MAX_KEYS keys
    (these tests' S = 9), SDPA the longer ones; a bound of 0 sends every row to SDPA."""
    if request.param == "sdpa":
        monkeypatch.setattr(attention, "EXPLICIT_MAX_KEYS", 0)
    return request.param


CASES = {
    "bidirectional": dict(causal=False, window=None),
    "causal": dict(causal=True, window=None),
    "causal_window": dict(causal=True, window=3),
    "bidirectional_window": dict(causal=False, window=3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rope", [False, True])
def test_attention_matches_naive(case, rope, kernel):
    kw = CASES[case]
    attn = make(**kw)
    x, x_ref = inputs().requires_grad_(), inputs().requires_grad_()
    rope_tables = RotaryEmbedding(attn.head_dim, S)() if rope else None
    got = attn(x, rope_tables)  # no mask: SDPA's is_causal, or the banded form where the window cuts
    want = naive_attention(
        attn, x_ref, naive_mask(S, S, **kw) if kw["causal"] or kw["window"] else None, rope
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_mask_kinds_give_different_outputs():
    """Guards the comparisons above: each mask really changes the result."""
    x = inputs()
    outs = [make(**kw)(x) for kw in CASES.values()]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.allclose(outs[i], outs[j], atol=1e-4)


def test_causal_output_ignores_the_future():
    attn = make(causal=True)
    x = inputs()
    y = x.clone()
    y[:, 5:] += 1.0
    torch.testing.assert_close(attn(x)[:, :5], attn(y)[:, :5])
    assert not torch.allclose(attn(x)[:, 5:], attn(y)[:, 5:])


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_attention(num_kv_heads, kernel):
    attn = make(num_heads=4, num_kv_heads=num_kv_heads, causal=True, window=4)
    assert attn.k_proj.weight.shape == (num_kv_heads * 8, HIDDEN)
    x = inputs()
    want = naive_attention(attn, x, naive_mask(S, S, causal=True, window=4), rope=False)
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)


def test_qk_norm_and_custom_scale(kernel):
    attn = make(num_heads=4, num_kv_heads=2, qk_norm=True, scale=0.3, norm_eps=1e-6)
    with torch.no_grad():  # gemma-form norms start at identity; give them a real scale
        attn.q_norm.weight.copy_(torch.linspace(-0.5, 0.5, 8))
        attn.k_norm.weight.copy_(torch.linspace(0.8, -0.2, 8))
    assert attn.scale == 0.3
    x = inputs()
    rope_tables = RotaryEmbedding(8, S)()
    torch.testing.assert_close(
        attn(x, rope_tables), naive_attention(attn, x, None, rope=True), rtol=1e-5, atol=1e-5
    )

    default = make(num_heads=4, num_kv_heads=2, qk_norm=True)
    assert default.scale == pytest.approx(1 / math.sqrt(8))
    with torch.no_grad():
        default.load_state_dict(attn.state_dict())
    assert not torch.allclose(default(x, rope_tables), attn(x, rope_tables))  # the scale is used


def test_explicit_mask_overrides_the_default(kernel):
    attn = make(causal=False)
    x = inputs()
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(S, S, generator=g) < 0.5
    mask |= torch.eye(S, dtype=torch.bool)  # every query keeps at least itself
    torch.testing.assert_close(
        attn(x, mask=mask), naive_attention(attn, x, mask, rope=False), rtol=1e-5, atol=1e-5
    )


def test_cpu_kernel_follows_the_row_length(monkeypatch):
    """Guards the kernel fixture: rows up to EXPLICIT_MAX_KEYS keys take explicit_attention, longer SDPA."""
    calls = []
    explicit = attention.explicit_attention
    monkeypatch.setattr(attention, "explicit_attention", lambda *a: calls.append(1) or explicit(*a))
    attn, x = make(causal=True), inputs()
    attn(x)
    assert calls == [1]
    monkeypatch.setattr(attention, "EXPLICIT_MAX_KEYS", S - 1)
    attn(x)
    assert calls == [1]


def test_cpu_kernel_without_autograd(monkeypatch):
    """Without autograd, unmasked short rows (the puzzle models' no-grad cycles) take SDPA's flash kernel
    and agree with the explicit form to 1e-5; masked rows (causal, decoding) keep the explicit form, as
    the flat decode layers do."""
    calls = []
    explicit = attention.explicit_attention
    monkeypatch.setattr(attention, "explicit_attention", lambda *a: calls.append(1) or explicit(*a))
    bidirectional, causal, x = make(), make(causal=True), inputs()
    with_grad = bidirectional(x)
    assert calls == [1]
    with torch.no_grad():
        without = bidirectional(x)
        assert calls == [1]
        causal(x)
        assert calls == [1, 1]
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        without, naive_attention(bidirectional, x, None, rope=False), rtol=1e-5, atol=1e-5
    )


def test_explicit_attention_row_without_keys_matches_sdpa():
    """A query that may see no key gets zeros and no gradient, as from SDPA, and the other rows agree."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5, generator=g) < 0.6
    mask[:, :, 0] |= True
    mask[1, :, 2] = False  # row 2 of batch 1 sees nothing
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = attention.explicit_attention(*leaves, 8**-0.5, mask)
    want = torch.nn.functional.scaled_dot_product_attention(*want_leaves, attn_mask=mask)
    assert torch.count_nonzero(got[1, :, 2]) == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(got.shape, generator=g)
    got.backward(grad)
    want.backward(grad)
    for a, b in zip(leaves, want_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_bf16_attention_near_fp32(kv_heads, kernel):
    """In bf16 (scores in bf16, softmax in fp32) both kernels stay near the fp32 naive result."""
    attn = make(num_kv_heads=kv_heads, causal=True)
    x = inputs()
    want = naive_attention(attn, x, naive_mask(S, S, causal=True, window=None), rope=False)
    got = attn.to(torch.bfloat16)(x.bfloat16()).float()
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2)  # measured 0.024; a wrong mask: 2.3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 1, 3, 20])
@pytest.mark.parametrize("q_len,k_len", [(6, 6), (2, 7), (1, 5)])
def test_attention_mask_semantics(causal, window, q_len, k_len):
    mask = attention_mask(q_len, k_len, causal=causal, window=window)
    if not causal and window is None:
        assert mask is None  # every pair may attend: no mask at all
        return
    assert mask.dtype == torch.bool and mask.shape == (q_len, k_len)
    assert torch.equal(mask, naive_mask(q_len, k_len, causal, window))


def test_attention_mask_by_hand():
    # causal window 2 over 4 positions: each query sees itself and the one before
    assert attention_mask(4, 4, causal=True, window=2).int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 1],
    ]
    # bidirectional window 2: itself and both neighbours
    assert attention_mask(3, 3, causal=False, window=2).int().tolist() == [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    # one new query after 3 cached keys, causal: it sees all 4
    assert attention_mask(1, 4, causal=True, window=None).int().tolist() == [[1, 1, 1, 1]]


def test_bad_head_counts_and_cpu_backend():
    with pytest.raises(ValueError, match="num_kv_heads=3 does not divide num_heads=4"):
        Attention(HIDDEN, 4, 3, 8)
    if not torch.cuda.is_available():
        assert flash_attn_func() is None  # CPU: explicit_attention or SDPA


# Packed rows: documents of mixed lengths (runs of equal ids; a repeated id later in the row is a new
# document), one of length 1, and two images inside documents.
PACKED_DOCS = [[0] * 5 + [1] + [2] * 9 + [3] * 8, [7] * 4 + [8] * 4 + [7] * 4 + [9] * 11]
PACKED_IMAGES = [[-1] * 7 + [0] * 4 + [-1] * 12, [-1] * 2 + [0] * 2 + [-1] * 8 + [1] * 5 + [-1] * 6]


def packed_allowed(docs: list[int], images: list[int], i: int, j: int, window: int | None) -> bool:
    """Gemma 3's rule inside one packed row: same document, and (causal within the window, or both
    tokens of one image with the key less than a window behind)."""
    run = [0]
    for a, b in zip(docs, docs[1:]):
        run.append(run[-1] + (a != b))
    if run[i] != run[j]:
        return False
    near = window is None or i - j < window
    same_image = images[i] >= 0 and images[i] == images[j]
    return (j <= i and near) or (same_image and near)


@pytest.mark.parametrize("window", [None, 3, 5, 64])
@pytest.mark.parametrize("with_images", [False, True])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize("band_chunk", [1, 64])
def test_document_runs_match_naive(window, with_images, num_kv_heads, band_chunk, monkeypatch):
    """Per-document attention (no [seq, seq] mask) equals naive attention under the packed row's mask,
    outputs and input gradients. Windows without images take the banded form, chunks of
    c = max(ceil(window / 2), BAND_CHUNK) queries attending to m = 1 + ceil((window - 1) / c) chunks of
    keys ([chunks, 1, c, m*c] mask): BAND_CHUNK 1 makes c half the window (window 3: c = 2, m = 2;
    window 5: c = 3, m = 3; window 64: c = 32, m = 3; the last two leave a partial last chunk of the 46
    flattened positions), 64 makes one chunk (c = 64, m = 2)."""
    monkeypatch.setattr(attention, "BAND_CHUNK", band_chunk)
    attn = make(num_kv_heads=num_kv_heads, causal=True, window=window)
    docs, images = torch.tensor(PACKED_DOCS), torch.tensor(PACKED_IMAGES)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    runs = DocumentRuns.build(starts, window=window, image_ids=images if with_images else None)
    s = docs.shape[1]
    banded = window is not None and not with_images
    assert (runs.band is not None) == banded and (runs.groups == ()) == banded
    if banded:
        c = max(-(-window // 2), band_chunk)
        m = 1 + -(-(window - 1) // c)
        assert runs.band.shape == (-(-2 * s // c), 1, c, m * c)
    imgs = PACKED_IMAGES if with_images else [[-1] * s] * 2
    mask = torch.tensor(
        [
            [[packed_allowed(PACKED_DOCS[r], imgs[r], i, j, window) for j in range(s)] for i in range(s)]
            for r in range(2)
        ]
    )
    x = torch.randn(2, s, HIDDEN, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    got, want = attn(x, mask=runs), naive_attention(attn, x_ref, mask, rope=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(got)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    if with_images:  # the images really see each other both ways: a later image token moves an earlier one
        y = x.detach().clone()
        y[0, 10] += 1.0
        changed = (attn(y, mask=runs) - got).abs().amax(-1)[0] > 1e-6
        assert changed[7:10].all() and not changed[:7].any()


@pytest.mark.parametrize("placement", ["post", "pre", "sandwich"])
@pytest.mark.parametrize("positions", [slice(0, 1), slice(2, 5)])
def test_block_output_at_some_positions_only(placement, positions):
    """A block asked for some positions (queries there, keys and values from all) gives the full block's
    output at those positions, for every norm placement, with RoPE, q/k norms and grouped heads."""
    from hrm_mega.models.block import SeqContext, attention_block

    block = attention_block(
        16, 4, 24, num_kv_heads=2, norm_placement=placement, norm_weight="gemma", qk_norm=True
    )
    init_parameters(block, 0)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 1:
                p.normal_(generator=torch.Generator().manual_seed(2))  # norm weights off zero
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(3))
    ctx = SeqContext(ropes={"global": RotaryEmbedding(4, 7)()})
    part = block(x, ctx, positions=positions)
    assert part.shape == (2, positions.stop - positions.start, 16)
    torch.testing.assert_close(part, block(x, ctx)[:, positions], rtol=1e-5, atol=1e-6)


def test_positions_refuse_masked_attention():
    from hrm_mega.models.block import SeqContext, attention_block

    x = torch.randn(1, 5, 16)
    for block in (attention_block(16, 4, 24, causal=True), attention_block(16, 4, 24, window=2)):
        init_parameters(block, 0)
        with pytest.raises(ValueError, match="full bidirectional attention"):
            block(x, SeqContext(), positions=slice(0, 1))
