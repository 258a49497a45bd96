"""The GPU check: one script, one GPU, about 5 minutes; on a machine without one, its CPU path.

Run it wherever a GPU is lent (it needs torch, numpy, PyYAML and this repository; flash-attn and apex
are used when they import, and each comparison that needs one says why it was skipped):

    python bench/gpu_check.py [--budget 330] [--json OUT.json] [--quick]

Sections, each bounded by what is left of --budget seconds:
1. attention on packed rows (documents of mixed length, a sliding window): against an fp64 reference
   with the dense document mask, the max error and forward+backward time of SDPA with the dense mask,
   per-document attention (DocumentRuns: grouped SDPA; with flash-attn installed, its variable-length
   kernel) and FlexAttention with a block mask (compiled on the GPU; its unfused eager form on the CPU,
   forward only, since torch has no Flex backward on the CPU);
2. RMSNorm: ours against apex's FusedRMSNorm (max error, time) when apex imports;
3. training: bf16 steps of the tiny recipe and of a 1B-shaped HRMGemma (Gemma 3 1B widths, fewer
   layers) on packed rows: tokens/s and MFU against the GPU's bf16 peak (from the device name; else the
   best large matmul measured here), FLOPs counted as bench/lm_throughput.py counts them with attention
   over each document only;
4. evaluation and generation: held-out loss of the trained tiny model, KV-cached greedy generation equal
   to uncached generation token for token (fp32), and bf16 decode tokens/s.
On the CPU (no CUDA) every size is cut down, the CUDA-only comparisons print why they were skipped, and
the script still exits 0 only if every check it ran passed. CI runs it that way (tests/test_bench.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lm_throughput import train_step_flops  # noqa: E402

from hrm_mega.config import LMModelConfig, load_config  # noqa: E402
from hrm_mega.inference.generate import generate, left_pad  # noqa: E402
from hrm_mega.models.attention import Attention, DocumentRuns, flash_attn_varlen_func  # noqa: E402
from hrm_mega.models.layers import RMSNorm, init_parameters  # noqa: E402
from hrm_mega.models.lm import HRMGemma, document_starts, lm_loss  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a substring of the device name.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


class Check:
    """Collects results; a failed check makes the script exit 1."""

    def __init__(self, budget: float) -> None:
        self.deadline, self.results, self.failed = time.perf_counter() + budget, {}, []

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def record(self, name: str, value, ok: bool = True, note: str = "") -> None:
        self.results[name] = value
        if not ok:
            self.failed.append(name)
        print(f"  {name}: {value}{'' if ok else '  FAILED'}{f'  ({note})' if note else ''}", flush=True)

    def skip(self, name: str, why: str) -> None:
        self.results[name] = f"skipped: {why}"
        print(f"  {name}: skipped: {why}", flush=True)


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def packed_doc_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    """Documents of mixed length (4 to seq/2) back to back in every row."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.empty(batch, seq, dtype=torch.long)
    for row in range(batch):
        start, doc = 0, 0
        while start < seq:
            length = int(torch.randint(4, max(5, seq // 2), (), generator=g))
            doc_ids[row, start : start + length] = doc
            start, doc = start + length, doc + 1
    return doc_ids


def document_lengths(doc_ids: torch.Tensor) -> list[int]:
    starts = document_starts(doc_ids).flatten().nonzero().squeeze(1)
    return torch.diff(starts, append=starts.new_tensor([doc_ids.numel()])).tolist()


def dense_document_mask(doc_ids: torch.Tensor, window: int) -> torch.Tensor:
    """[b, 1, s, s]: same document, causal, keys less than `window` behind."""
    runs = document_starts(doc_ids).cumsum(1)
    pos = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    near = (pos[:, None] - pos[None, :] < window) & (pos[None, :] <= pos[:, None])
    return ((runs[:, :, None] == runs[:, None, :]) & near).unsqueeze(1)


def attention_section(check: Check, device: torch.device, quick: bool) -> None:
    print("1. attention on packed rows", flush=True)
    batch, heads, kv_heads, dim = (2, 4, 2, 32) if device.type == "cpu" else (4, 8, 2, 128)
    seq, window = (128 if quick else 512, 32) if device.type == "cpu" else (4096, 512)
    doc_ids = packed_doc_ids(batch, seq, seed=0).to(device)
    attn = Attention(heads * dim, heads, kv_heads, dim, causal=True, window=window).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, seq, dim, device=device, generator=g)
    k, v = (torch.randn(batch, kv_heads, seq, dim, device=device, generator=g) for _ in range(2))
    mask = dense_document_mask(doc_ids, window)
    kr, vr = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(
        q.double(), kr.double(), vr.double(), attn_mask=mask, scale=attn.scale
    )
    runs = DocumentRuns.build(document_starts(doc_ids), window=window)
    reps = 1 if device.type == "cpu" else 5
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        qd, kd, vd = (t.to(dtype).requires_grad_() for t in (q, k, v))

        def dense(qd=qd, kd=kd, vd=vd) -> torch.Tensor:
            kk, vv = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (kd, vd))
            return F.scaled_dot_product_attention(qd, kk, vv, attn_mask=mask, scale=attn.scale)

        def per_document(qd=qd, kd=kd, vd=vd) -> torch.Tensor:
            return runs.attend(qd, kd, vd, attn.scale)

        paths = {"sdpa_dense_mask": dense, "documents": per_document}
        name = str(dtype).removeprefix("torch.")
        for path, fn in paths.items():
            err = (fn().double() - ref).abs().max().item()
            if check.left() < 30:
                check.skip(f"attention/{path}/{name}", "out of time")
                continue
            seconds = timed(lambda fn=fn: fn().float().sum().backward(), device, reps)
            check.record(f"attention/{path}/{name}/max_err", f"{err:.2e}", ok=err < tol)
            check.record(f"attention/{path}/{name}/fwd_bwd_ms", round(seconds * 1e3, 2))
        if flash_attn_varlen_func() is not None and dtype == torch.bfloat16:
            check.record("attention/documents_uses_flash_varlen", True)
        elif dtype == torch.bfloat16 or device.type == "cpu":
            check.skip(
                f"attention/flash_varlen/{name}",
                "no CUDA" if device.type == "cpu" else "flash_attn does not import",
            )
        flex_section(
            check, device, q.to(dtype), k.to(dtype), v.to(dtype), doc_ids, window, attn.scale, ref, tol
        )


def flex_section(check, device, q, k, v, doc_ids, window, scale, ref, tol) -> None:
    """FlexAttention with a document/causal/window block mask: compiled on the GPU, eager on the CPU."""
    name = str(q.dtype).removeprefix("torch.")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        check.skip(f"attention/flex/{name}", f"this torch has no FlexAttention ({e})")
        return
    runs = document_starts(doc_ids).cumsum(1)

    def mask_mod(b, h, q_idx, kv_idx):
        return (runs[b, q_idx] == runs[b, kv_idx]) & (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    b, _, s, _ = q.shape
    block_mask = create_block_mask(mask_mod, b, None, s, s, device=str(device))
    gqa = q.shape[1] != k.shape[1]
    if device.type == "cuda":
        kernel = torch.compile(flex_attention)

        def flex() -> torch.Tensor:
            return kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        qg = q.detach().requires_grad_()
        err = (flex().double() - ref).abs().max().item()
        seconds = timed(
            lambda: (
                kernel(qg, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa).float().sum().backward()
            ),
            device,
            5,
        )
        check.record(f"attention/flex/{name}/max_err", f"{err:.2e}", ok=err < tol)
        check.record(f"attention/flex/{name}/fwd_bwd_ms", round(seconds * 1e3, 2))
    else:
        import warnings

        with warnings.catch_warnings():  # the eager form warns that it is unfused, which we know
            warnings.simplefilter("ignore")
            out = flex_attention(
                q.detach(), k.detach(), v.detach(), block_mask=block_mask, scale=scale, enable_gqa=gqa
            )
        err = (out.double() - ref).abs().max().item()
        check.record(f"attention/flex_eager_forward/{name}/max_err", f"{err:.2e}", ok=err < tol)
        check.skip("attention/flex_compiled", "no CUDA (torch has no FlexAttention backward on the CPU)")


def rmsnorm_section(check: Check, device: torch.device) -> None:
    print("2. RMSNorm", flush=True)
    try:
        from apex.normalization import FusedRMSNorm
    except ImportError:
        check.skip("rmsnorm/apex", "apex does not import")
        return
    if device.type != "cuda":
        check.skip("rmsnorm/apex", "no CUDA")
        return
    hidden = 1152
    ours = RMSNorm(hidden, 1e-6, "standard").to(device)
    init_parameters(ours, seed=0)
    theirs = FusedRMSNorm(hidden, eps=1e-6).to(device)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
    x = torch.randn(8, 4096, hidden, device=device)
    err = (ours(x) - theirs(x)).abs().max().item()
    check.record("rmsnorm/apex_vs_ours/max_err", f"{err:.2e}", ok=err < 1e-4)
    xg = x.clone().requires_grad_()
    for label, norm in (("ours", ours), ("apex", theirs)):
        seconds = timed(lambda norm=norm: norm(xg).sum().backward(), device, 20)
        check.record(f"rmsnorm/{label}/fwd_bwd_ms", round(seconds * 1e3, 3))


def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    """The GPU's dense bf16 peak: from its data sheet, else the best 8192^2 matmul measured here."""
    if device.type != "cuda":
        return None, "no GPU: MFU is reported on GPUs only"
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAKS.items():
        if key in name:
            return peak, f"{name} data sheet"
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / timed(lambda: a @ a, device, 20), "best matmul measured here"


def train_section(check: Check, device: torch.device, quick: bool) -> HRMGemma | None:
    print("3. training (bf16)", flush=True)
    peak, source = bf16_peak(device)
    if peak is None:
        check.skip("train/bf16_peak_tflops", source)
    else:
        check.record("train/bf16_peak_tflops", round(peak / 1e12, 1), note=source)
    tiny = load_config(ROOT / "configs/lm/hrmgemma_tiny.yaml").model
    one_b = dataclasses.replace(
        load_config(ROOT / "configs/lm/hrmgemma_1b.yaml").model,
        num_layers=6,
        vocab_size=32768,
        max_position=4096,
    )
    if device.type == "cpu":
        shapes = [("tiny", tiny, 2, 128, 2 if quick else 4)]
    else:
        shapes = [("tiny", tiny, 16, 1024, 20), ("1b_shaped", one_b, 4, 4096, 10)]
    trained = None
    for label, config, batch, seq, steps in shapes:
        if check.left() < 60:
            check.skip(f"train/{label}", "out of time")
            continue
        config = dataclasses.replace(config, max_position=max(config.max_position, seq))
        model = HRMGemma(config).init_weights(0).to(device=device, dtype=torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, config.vocab_size, (batch, seq), generator=g).to(device)
        doc_ids = packed_doc_ids(batch, seq, seed=1).to(device)
        labels = ids.masked_fill(document_starts(doc_ids), -100)
        losses: list[float] = []
        step = training_step(model, optimizer, ids, doc_ids, labels, losses)
        seconds = timed(step, device, steps)
        flops = step_flops(config, batch, seq, document_lengths(doc_ids.cpu()))
        check.record(f"train/{label}/tokens_per_s", round(batch * seq / seconds))
        if peak is not None:
            check.record(f"train/{label}/mfu_pct", round(100 * flops / seconds / peak, 2))
        finite = all(math.isfinite(x) for x in losses)
        check.record(f"train/{label}/losses_finite", finite, ok=finite)
        if label == "tiny":
            trained = model
    return trained


def training_step(model, optimizer, ids, doc_ids, labels, losses: list[float]) -> Callable[[], None]:
    """forward, lm_loss (fp32 logits), backward, AdamW; appends each step's loss to `losses`."""

    def step() -> None:
        logits, aux = model(ids, doc_ids=doc_ids)
        loss = lm_loss(logits.float(), labels, aux, model.config)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step


def step_flops(c: LMModelConfig, batch: int, seq: int, lengths: list[int]) -> float:
    """bench/lm_throughput.py's count, with attention scoring each document's pairs only."""
    return train_step_flops(c, c.h_cycles, batch, seq, pairs=sum(n * n for n in lengths) / batch)


def generate_section(check: Check, device: torch.device, model: HRMGemma | None) -> None:
    print("4. evaluation and generation", flush=True)
    if model is None or check.left() < 20:
        check.skip("generate", "no trained model" if model is None else "out of time")
        return
    config = model.config
    model = model.float().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, config.vocab_size, (4, 64), generator=g).to(device)
    with torch.no_grad():
        logits, aux = model(ids)
        loss = lm_loss(logits, ids, aux, config)["loss"].item()
    check.record("eval/loss", round(loss, 4), ok=loss == loss)
    prompts, mask = left_pad([ids[i, : 8 + 4 * i].tolist() for i in range(4)], device=device)
    options = dict(attention_mask=mask, max_new_tokens=16)
    cached = generate(model, prompts, use_cache=True, **options).tokens
    uncached = generate(model, prompts, use_cache=False, **options).tokens
    same = torch.equal(cached, uncached)
    check.record("generate/cached_equals_uncached", same, ok=same)
    bf16 = model.to(torch.bfloat16)
    seconds = timed(lambda: generate(bf16, prompts, attention_mask=mask, max_new_tokens=32), device, 1)
    check.record("generate/bf16_tokens_per_s", round(4 * 32 / seconds, 1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the whole check")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="CPU path at its smallest (CI)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check = Check(args.budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no CUDA)"
    print(f"gpu_check: torch {torch.__version__}, {name}", flush=True)
    torch.manual_seed(0)
    attention_section(check, device, args.quick)
    rmsnorm_section(check, device)
    model = train_section(check, device, args.quick)
    generate_section(check, device, model)
    check.results["device"], check.results["failed"] = name, check.failed
    if args.json:
        args.json.write_text(json.dumps(check.results, indent=1))
    print("gpu_check: " + ("all checks passed" if not check.failed else f"FAILED: {', '.join(check.failed)}"))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
