"""Peak memory and speed of `prep text` at corpus scale (issue #19): memory must not grow with the input.

Generates seeded gzip-compressed JSONL corpora of 0.25, 0.5 and 1 GB of uncompressed JSONL (each a
prefix of the next), then runs `python -m hrm_mega.prep text` on each in a child process and polls /proc
every 0.1 s: the peak RSS (VmHWM) of the prep process itself and of each of its encoding workers, and
the sum of their PSS (proportional set size: a page shared after fork counts once, split between the
processes that map it), the honest total at one moment. The sum of the peaks overcounts: forked
workers start out sharing the parent's pages, and the peaks need not coincide.

    python bench/prep_text_memory.py --work /tmp/prep-bench
    python bench/prep_text_memory.py --sizes 0.25 --check-workers   # + 1 vs 2 workers, same shards?

The text: words drawn with Zipf frequencies (rank^-1.07) from 200k generated spellings (English letter
frequencies, some capitalised, accented, with punctuation, or numbers), an escaped newline among the
most frequent; 35-330 words a document (about 200-2600 characters). Generation is vectorised numpy, a
block of a million words at a time.

Targets (issue #19): the prep process's peak RSS < 1.5 GB on 1 GB, and peak(1 GB) <= 1.1 x peak(0.25 GB).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LETTERS = b"etaoinshrdlcumwfgypbvkjxqz"
LETTER_FREQ = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
               1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]  # fmt: skip
OPEN, SEP = b'{"text": "', b'"}\n{"text": "'  # JSONL around the documents' text
GB = 1e9


# ---- the corpus -------------------------------------------------------------------------------------


def word_table(rng: np.random.Generator, types: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`types` distinct spellings, each followed by a space, as (one byte blob, starts, lengths) in rank
    order. Every spelling is valid inside a JSON string (no quotes, no backslashes but the escaped
    newline, no control characters)."""
    p = np.array(LETTER_FREQ) / sum(LETTER_FREQ)
    words: dict[bytes, None] = {}
    while len(words) < types:
        lengths = np.clip(rng.geometric(0.2, types), 1, 20)
        letters = rng.choice(np.frombuffer(LETTERS, np.uint8), size=int(lengths.sum()), p=p).tobytes()
        ends, kinds = np.cumsum(lengths).tolist(), rng.random(types).tolist()
        for end, length, kind in zip(ends, lengths.tolist(), kinds):
            word = letters[end - length : end]
            if kind < 0.03:
                word = word[:-1] + "é".encode()
            elif kind < 0.05:
                word = word.capitalize()
            elif kind < 0.08:
                word += b","
            elif kind < 0.10:
                word += b"."
            elif kind < 0.12:
                word = str(int(rng.integers(0, 10 ** int(rng.integers(1, 6))))).encode()
            words[word + b" "] = None
    table = list(words)[:types]
    table[3] = b"\\n "  # a newline (escaped, as JSON writes it) among the most frequent words
    lengths = np.array([len(w) for w in table], dtype=np.int64)
    return np.frombuffer(b"".join(table), np.uint8), np.cumsum(lengths) - lengths, lengths


def jsonl_blocks(seed: int, block_words: int = 1 << 20) -> Iterator[bytes]:
    """An endless stream of JSONL blocks, each whole documents {"text": ...}, one per line."""
    rng = np.random.default_rng(seed)
    blob, starts, lengths = word_table(rng, 200_000)
    cdf = np.cumsum(np.arange(1, len(starts) + 1, dtype=np.float64) ** -1.07)
    cdf /= cdf[-1]
    while True:
        ids = np.minimum(np.searchsorted(cdf, rng.random(block_words)), len(cdf) - 1)
        ends = np.cumsum(rng.integers(35, 330, size=block_words // 35))  # words per document
        ends = ends[ends <= block_words]
        ids = ids[: ends[-1]]
        sizes = lengths[ids]
        out_ends = np.cumsum(sizes)
        # byte k of word j lands at out_ends[j] - sizes[j] + k: one gather builds the whole block
        body = blob[np.repeat(starts[ids] - (out_ends - sizes), sizes) + np.arange(int(out_ends[-1]))]
        body[out_ends[ends - 1] - 1] = 0  # the space after a document's last word marks its end
        yield OPEN + body.tobytes().replace(b"\x00", SEP)[: -len(OPEN)]


def write_corpora(work: Path, sizes: list[float], seed: int) -> dict[float, Path]:
    """corpus-SIZE.jsonl.gz for each size (GB of uncompressed JSONL), each a prefix of the next."""
    paths = {size: work / f"corpus-{size:g}GB.jsonl.gz" for size in sizes}
    if all(p.is_file() for p in paths.values()):
        return paths
    files = {size: gzip.open(paths[size], "wb", compresslevel=1) for size in sizes}  # noqa: SIM115
    written = 0
    for block in jsonl_blocks(seed):
        for size, f in list(files.items()):
            if written < size * GB:
                f.write(block)
            else:
                f.close()
                del files[size]
        if not files:
            break
        written += len(block)
    return paths


def uncompressed_bytes(path: Path) -> int:
    with gzip.open(path, "rb") as f:
        return sum(len(chunk) for chunk in iter(lambda: f.read(1 << 24), b""))


# ---- measuring --------------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def run_measured(command: list[str], interval: float = 0.1) -> dict[str, float]:
    """Runs `command`, polling the memory of it and its children; returns MB figures and seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    main_peak = pss_peak = 0
    worker_peaks: dict[int, int] = {}
    while True:
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if done:
            break
        try:
            main_peak = max(main_peak, _status_kb(proc.pid, "VmHWM"))
            pss = _pss_kb(proc.pid)
            for child in _children(proc.pid):
                try:
                    worker_peaks[child] = max(worker_peaks.get(child, 0), _status_kb(child, "VmHWM"))
                    pss += _pss_kb(child)
                except OSError:  # the worker ended between the listing and the read
                    pass
            pss_peak = max(pss_peak, pss)
        except OSError:  # the process ended: wait4 reaps it next round
            pass
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {proc.returncode}):\n{output[-3000:]}")
    mb = 1024.0
    return {
        "seconds": time.perf_counter() - start,
        "main_peak": main_peak / mb,
        "worker_peak": max(worker_peaks.values(), default=0) / mb,
        "sum_of_peaks": (main_peak + sum(worker_peaks.values())) / mb,
        "pss_peak": pss_peak / mb,
        "any_process_peak": usage.ru_maxrss / mb,  # wait4: the max over the child and those it reaped
    }


def prep_command(corpus: Path, out: Path, args: argparse.Namespace, workers: int) -> list[str]:
    return [sys.executable, "-m", "hrm_mega.prep", "text", "--input", str(corpus), "--vocab-size",
            str(args.vocab_size), "--seq-len", str(args.seq_len), "--workers", str(workers), "--seed",
            str(args.seed), "--out", str(out), "--overwrite", "--quiet"]  # fmt: skip


def shard_hashes(out: Path) -> list[str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="corpora and outputs (default: a temporary directory)")
    p.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="GB of JSONL")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-workers", action="store_true", help="1 vs --workers on the smallest size")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prep-text-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    t0 = time.perf_counter()
    corpora = write_corpora(work, sizes, args.seed)
    print(f"corpora in {work} ({time.perf_counter() - t0:.0f} s to generate)", flush=True)

    header = (f"{'JSONL GB':>8} {'docs':>9} {'tokens':>11} {'wall s':>7} {'MB/s':>6} {'main peak':>10} "
              f"{'worker peak':>12} {'sum of peaks':>13} {'PSS peak':>9}  (MB)")  # fmt: skip
    rows = {}
    for size in sizes:
        out = work / f"out-{size:g}GB"
        figures = run_measured(prep_command(corpora[size], out, args, args.workers))
        manifest = json.loads((out / "manifest.json").read_text())
        docs = sum(manifest["extra"]["documents"].values())
        tokens = sum(manifest["extra"]["tokens"].values())
        mb_per_s = uncompressed_bytes(corpora[size]) / 1e6 / figures["seconds"]
        rows[size] = figures
        if len(rows) == 1:
            print(header)
        print(f"{size:>8g} {docs:>9} {tokens:>11} {figures['seconds']:>7.0f} {mb_per_s:>6.2f} "
              f"{figures['main_peak']:>10.0f} {figures['worker_peak']:>12.0f} {figures['sum_of_peaks']:>13.0f} "
              f"{figures['pss_peak']:>9.0f}", flush=True)  # fmt: skip
        if not (args.check_workers and size == sizes[0]):
            shutil.rmtree(out)
    small, large = rows[sizes[0]]["main_peak"], rows[sizes[-1]]["main_peak"]
    print(f"main peak at {sizes[-1]:g} GB / at {sizes[0]:g} GB: {large / small:.3f} (target <= 1.1); "
          f"at {sizes[-1]:g} GB {large:.0f} MB (target < 1500)")  # fmt: skip
    if args.check_workers:
        one = work / f"out-{sizes[0]:g}GB-w1"
        run_measured(prep_command(corpora[sizes[0]], one, args, 1))
        same = shard_hashes(one) == shard_hashes(work / f"out-{sizes[0]:g}GB")
        print(f"workers 1 vs {args.workers} at {sizes[0]:g} GB: shards {'identical' if same else 'DIFFER'}")
        shutil.rmtree(one)
        shutil.rmtree(work / f"out-{sizes[0]:g}GB")
        if not same:
            return 1
    if args.work is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
