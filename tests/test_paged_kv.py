"""The paged KV cache (models/paged_kv_cache.py): blocks, block tables, sharing, offload.

The oracle is the uncached reference of test_generate.py: generation through a paged cache, with every
block resident or with a resident budget of a quarter of the blocks the run needs (the rest offloaded
to memory-mapped files), gives the same tokens, cycles and logits.
"""

from __future__ import annotations

import pytest
import torch
from test_generate import max_diff, random_ids, recurrent_model

from hrm_mega.inference.generate import generate, left_pad, stream_generate
from hrm_mega.models.paged_kv_cache import OffloadError, PagedKVCache, pool_for


def _peak_blocks(model, ids, block_size: int, **kwargs) -> int:
    pool = pool_for(model, block_size=block_size)
    list(stream_generate(model, ids, kv_pool=pool, **kwargs))
    assert pool.blocks_in_use == 0  # the generation gave every block back
    return pool.counters["peak_blocks"]


@pytest.mark.parametrize(
    ("max_cycles", "halt_threshold"), [(4, 0.5), (5, None)], ids=["early-halting", "cycles-raised"]
)
def test_paged_generation_with_a_quarter_resident_equals_uncached(max_cycles, halt_threshold) -> None:
    model = recurrent_model(seed=8)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 6)]
    ids, mask = left_pad(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, max_cycles=max_cycles, halt_threshold=halt_threshold,
                  greedy=True)  # fmt: skip
    peak = _peak_blocks(model, ids, 4, **kwargs)
    pool = pool_for(model, block_size=4, resident_blocks=peak // 4)
    paged = list(stream_generate(model, ids, kv_pool=pool, **kwargs))
    uncached = list(stream_generate(model, ids, use_cache=False, **kwargs))
    assert len(paged) == len(uncached) == 12  # 21 positions > the window of 4: local slots drop blocks
    for a, b in zip(paged, uncached, strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.cycles, b.cycles)
        assert max_diff(a.logits, b.logits) < 1e-4
    assert pool.counters["peak_resident"] <= peak // 4 < peak
    assert pool.resident_bytes() == (peak // 4) * pool.block_bytes
    assert pool.counters["offloaded"] > 0 and pool.counters["reloaded"] > 0
    assert pool.blocks_in_use == 0


def test_finished_rows_free_their_blocks_and_sampling_is_unchanged() -> None:
    model = recurrent_model(seed=12)
    ids, mask = left_pad([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]])
    halting = dict(max_cycles=torch.tensor([2, 3, 2, 4]), halt_threshold=torch.tensor([0.5, 0.6, 0.4, 0.5]))
    free = generate(model, ids, attention_mask=mask, max_new_tokens=8, greedy=True, **halting)
    eos = int(free.tokens[1, 1])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, eos_id=eos, pad_id=0, temperature=1.5, top_k=20, seed=3,
                  **halting)  # fmt: skip
    pool = pool_for(model, block_size=2, resident_blocks=40)
    reference = generate(model, ids, use_cache=False, **kwargs)
    paged = generate(model, ids, kv_pool=pool, **kwargs)
    assert torch.equal(paged.tokens, reference.tokens) and torch.equal(paged.cycles, reference.cycles)
    assert int(paged.lengths.min()) < 8  # a row finished early and left
    assert pool.counters["offloaded"] > 0 and pool.blocks_in_use == 0


def test_joined_caches_share_blocks_and_decode_as_alone() -> None:
    """Two prompts prefilled alone (1 and 3 cycles) join without copying; each row decodes as alone."""
    model = recurrent_model(seed=3)
    pool = pool_for(model, block_size=4)
    short, long = random_ids(1, 3, seed=1), random_ids(1, 9, seed=2)
    parts, alone = [], []
    for ids, cycles in ((short, 1), (long, 3)):
        cache = PagedKVCache(pool)
        with torch.no_grad():
            model.infer(ids, max_cycles=cycles, cache=cache)
        parts.append(cache)
    blocks = pool.blocks_in_use
    joined = PagedKVCache.concat(parts)
    assert pool.blocks_in_use == blocks and joined.lengths == [3, 9] and joined.steps("blocks.0.H.0") == 3
    assert joined.valid[0].tolist() == [False] * 6 + [True] * 3
    token, cycles = torch.tensor([[5], [6]]), torch.tensor([1, 3])
    with torch.no_grad():
        together, c_together = model.infer(token, position_ids=torch.tensor([[3], [9]]), max_cycles=cycles,
                                           attention_mask=torch.ones_like(token), cache=joined)  # fmt: skip
        for row, ids in enumerate((short, long)):
            full = torch.cat((ids, token[row : row + 1]), dim=1)
            reference, c_ref = model.infer(full, max_cycles=int(cycles[row]))
            alone.append((reference[:, -1:], c_ref[:, :, -1:]))
    assert pool.counters["copied_on_write"] > 0  # the short row's steps 2-3 shared its step-1 blocks
    for row in range(2):
        assert max_diff(together[row : row + 1], alone[row][0]) < 1e-4
        assert torch.equal(c_together[:, row : row + 1], alone[row][1])
    joined.select(torch.tensor([1]))
    assert 0 < pool.blocks_in_use < blocks + 16
    joined.release()
    assert pool.blocks_in_use == 0


def test_a_budget_below_one_attention_call_is_one_line() -> None:
    model = recurrent_model(seed=8)
    pool = pool_for(model, block_size=2, resident_blocks=2)
    with pytest.raises(OffloadError, match="resident budget of 2 blocks is smaller than what one attention"):
        generate(model, random_ids(2, 9), max_new_tokens=2, greedy=True, kv_pool=pool)


# --------------------------------------------------------------------------------------------------
# int8 keys/values
# --------------------------------------------------------------------------------------------------


def test_int8_blocks_hold_each_vector_with_its_own_scale() -> None:
    """A stored key/value vector is round(x / s) as int8 with s = max|x| / 127 (per position and kv head),
    s in the 4 bytes after it; reading gives q * s, within s / 2 of x; a block is (d + 4) / 4d of fp32's."""
    model = recurrent_model(seed=8)
    fp32, int8 = pool_for(model, block_size=4), pool_for(model, block_size=4, kv_dtype="int8")
    d = model.config.head_dim
    assert int8.block_bytes * 4 * d == fp32.block_bytes * (d + 4)  # 288 of 1024 bytes at d = 32
    x = torch.randn(3, 2, model.config.num_kv_heads, d, generator=torch.Generator().manual_seed(0)) * 5
    x[0, 1] = 0.0  # an all-zero vector keeps scale 0
    rows = int8.encode(x)
    assert rows.dtype == torch.int8 and rows.shape[-1] == d + 4
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    expected_q = torch.where(scale > 0, x / torch.where(scale > 0, scale, 1.0), 0.0).round()
    assert torch.equal(rows[..., :d].float(), expected_q)
    assert torch.equal(rows[..., d:].contiguous().view(torch.float32), scale)
    back = int8.decode(rows)
    assert torch.equal(back, expected_q * scale)
    assert bool(((back - x).abs() <= scale / 2 + 1e-6).all())
    assert int8.encode(back).equal(rows)  # re-storing what was read (fill_unrun) loses nothing more


def test_int8_generation_agrees_with_fp32_and_offload_changes_nothing() -> None:
    """Without halting, int8 keys/values give the uncached greedy tokens here, logits within 0.25 (of
    magnitude ~2); with a quarter of the blocks resident the int8 run is bit for bit the same."""
    model = recurrent_model(seed=8)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 9, 6)]
    ids, mask = left_pad(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, max_cycles=5, greedy=True)
    uncached = list(stream_generate(model, ids, use_cache=False, **kwargs))
    pool = pool_for(model, block_size=4, kv_dtype="int8")
    int8 = list(stream_generate(model, ids, kv_pool=pool, **kwargs))
    fp32 = list(stream_generate(model, ids, kv_pool=pool_for(model, block_size=4), **kwargs))
    budget = pool.counters["peak_blocks"] // 4
    offloaded_pool = pool_for(model, block_size=4, kv_dtype="int8", resident_blocks=budget)
    offloaded = list(stream_generate(model, ids, kv_pool=offloaded_pool, **kwargs))
    assert (
        offloaded_pool.counters["offloaded"] > 0
        and offloaded_pool.resident_bytes() == budget * pool.block_bytes
    )
    diffs = [max_diff(a.logits, b.logits) for a, b in zip(int8, uncached, strict=True)]
    print("int8 vs fp32: max |logit difference| per step", [round(d, 4) for d in diffs])
    assert diffs[0] == 0  # the prompt's positions attend to each other unquantized in the prefill
    assert 0 < max(diffs[1:]) < 0.25  # later steps read int8 keys/values: close, not equal
    for a, b, c, e in zip(int8, uncached, offloaded, fp32, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert max_diff(e.logits, b.logits) < 1e-4
        assert torch.equal(a.logits, c.logits) and torch.equal(a.cycles, c.cycles)
    with pytest.raises(ValueError, match="kv_dtype='int4' must be one of model, int8"):
        pool_for(model, kv_dtype="int4")
