"""Load test of `hrm-mega serve`: continuous batching against one request at a time, outputs checked.

Starts `python -m hrm_mega.entry.serve CKPT --port 0` as a subprocess on 127.0.0.1 (by default on a
random-init model of configs/lm/hrmgemma_tiny.yaml, saved as a model directory with a SentencePiece
tokenizer trained here on generated arithmetic text), then drives it with the official `openai` async
client, every request streamed (server-sent events) with its token ids returned:

1. alone: the N requests one at a time: the reference outputs, and the one-at-a-time throughput;
2. all at once: the N requests concurrently; each must return exactly its tokens from (1);
3. concurrency C: the N requests with at most C in flight; each must again equal (1).

The N requests mix prompt lengths (1-60 words) and output lengths (--min-tokens..--max-tokens, ignore_eos
so each runs its full length), half greedy and half sampled (temperature 1.2, top_p 0.95, each with
its own seed), a quarter with their own max_cycles and halt_threshold. Reported per phase: wall time,
new tokens/s over the phase, request latency p50/p99 (send to last chunk) and time to first token
p50/p99; then the throughput ratio of (3) and (2) to (1). The run is bounded: a fixed number of
requests to 127.0.0.1 only, and --timeout seconds at most, after which it stops the server and exits 1.
Exit status 1 also when an output differs or the ratio at concurrency C is below --min-ratio.

    python bench/serve_load.py [--checkpoint CKPT [--tokenizer TOK]] [--requests 64] [--concurrency 16]
        [--min-tokens 8] [--max-tokens 48] [--max-batch 64] [--threads 2] [--min-ratio 4] [--timeout 900]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(out: Path) -> Path:
    """A random-init hrmgemma_tiny model directory whose data.path holds a fresh SentencePiece model."""
    import sentencepiece as spm

    from hrm_mega.checkpoint.model_dir import save_model_dir
    from hrm_mega.config import Config, DataConfig, load_config
    from hrm_mega.models.lm import HRMGemma

    rng = random.Random(0)
    corpus = [
        f"{a} plus {b} is {a + b}."
        for a, b in ((rng.randrange(100), rng.randrange(100)) for _ in range(2000))
    ]
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(data / "tokenizer"), vocab_size=100, model_type="unigram",
        bos_id=1, eos_id=2, pad_id=0, unk_id=3, num_threads=1, minloglevel=2,
    )  # fmt: skip
    config = load_config(ROOT / "configs/lm/hrmgemma_tiny.yaml")
    model = HRMGemma(config.model).init_weights(0)
    return save_model_dir(
        model.state_dict(), Config(model=config.model, data=DataConfig(path=str(data))), out / "model"
    )


def start_server(args: argparse.Namespace, checkpoint: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """The server subprocess (its output goes to `log`) and its URL, read from its startup line."""
    cmd = [sys.executable, "-m", "hrm_mega.entry.serve", str(checkpoint), "--host", "127.0.0.1", "--port", "0",
           "--max-batch", str(args.max_batch), "--max-waiting", str(args.requests), "--device", "cpu"]  # fmt: skip
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        for (
            line
        ) in log.read_text().splitlines():  # "hrm-mega serve: listening on http://HOST:PORT (model NAME)"
            if "listening on " in line:
                return server, line.split("listening on ")[1].split()[0]
        time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")


def make_requests(n: int, min_tokens: int, max_tokens: int, model: str) -> list[dict]:
    rng = random.Random(1)
    jobs = []
    for i in range(n):
        words = rng.randint(1, 60)
        prompt = " ".join(rng.choice(["plus", "is", str(rng.randrange(100))]) for _ in range(words))
        extra = {"return_token_ids": True, "ignore_eos": True}
        if i % 4 == 3:
            extra.update(max_cycles=rng.choice([1, 3]), halt_threshold=0.6)
        job = {
            "model": model,
            "prompt": prompt,
            "max_tokens": rng.randint(min_tokens, max_tokens),
            "extra_body": extra,
        }
        job.update(
            {"temperature": 0} if i % 2 == 0 else {"temperature": 1.2, "top_p": 0.95, "seed": 1000 + i}
        )
        jobs.append(job)
    return jobs


async def run_one(client, job: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens: list[int] = []
    stream = await client.completions.create(stream=True, **job)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].token_ids:
            first = first or time.perf_counter()
            tokens += chunk.choices[0].token_ids
    end = time.perf_counter()
    return {"tokens": tokens, "latency": end - start, "ttft": (first or end) - start}


async def run_phase(client, jobs: list[dict], concurrency: int) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(concurrency)

    async def gated(job: dict) -> dict:
        async with gate:
            return await run_one(client, job)

    start = time.perf_counter()
    results = await asyncio.gather(*(gated(job) for job in jobs))
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(name: str, results: list[dict], seconds: float) -> dict:
    tokens = sum(len(r["tokens"]) for r in results)
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    return {
        "phase": name, "requests": len(results), "tokens": tokens, "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1), "latency_p50_s": round(percentile(lat, 50), 3),
        "latency_p99_s": round(percentile(lat, 99), 3), "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
    }  # fmt: skip


async def bench(args: argparse.Namespace, url: str, model: str) -> int:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=args.timeout)
    jobs = make_requests(args.requests, args.min_tokens, args.max_tokens, model)
    await run_phase(client, jobs[:2], 1)  # warm-up
    phases = [
        ("alone", 1),
        (f"all {args.requests} at once", args.requests),
        (f"concurrency {args.concurrency}", args.concurrency),
    ]
    rows, reference, status = [], None, 0
    for name, concurrency in phases:
        results, seconds = await run_phase(client, jobs, concurrency)
        rows.append(summary(name, results, seconds))
        tokens = [r["tokens"] for r in results]
        if reference is None:
            reference = tokens
        else:
            differ = [i for i, (a, b) in enumerate(zip(reference, tokens, strict=True)) if a != b]
            rows[-1]["outputs_equal_alone"] = not differ
            if differ:
                print(f"FAIL {name}: requests {differ[:8]} differ from their runs alone", flush=True)
                status = 1
    print(f"{'phase':>22} {'req':>4} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'lat p50':>8} {'lat p99':>8} "
          f"{'ttft p50':>9} {'ttft p99':>9}  equal")  # fmt: skip
    for r in rows:
        print(f"{r['phase']:>22} {r['requests']:>4} {r['tokens']:>7} {r['seconds']:>7} {r['tokens_per_s']:>7} "
              f"{r['latency_p50_s']:>8} {r['latency_p99_s']:>8} {r['ttft_p50_s']:>9} {r['ttft_p99_s']:>9}  "
              f"{r.get('outputs_equal_alone', 'ref')}")  # fmt: skip
    ratios = {r["phase"]: round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 2) for r in rows[1:]}
    for phase, ratio in ratios.items():
        print(f"throughput {phase} / alone: x{ratio}")
    ratio = ratios[f"concurrency {args.concurrency}"]
    verdict = "PASS" if ratio >= args.min_ratio else "FAIL"
    print(
        f"{verdict} concurrency {args.concurrency} runs x{ratio} the one-at-a-time throughput (>= x{args.min_ratio})"
    )
    print(json.dumps({"phases": rows, "ratios": ratios}))
    return status or (0 if verdict == "PASS" else 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="model to serve (default: a random-init hrmgemma_tiny built here)")
    p.add_argument("--tokenizer", help="its SentencePiece model, if the server cannot find it")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--min-ratio", type=float, default=4.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole load test at most")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else build_model(Path(tmp))
        server, url = start_server(args, checkpoint, Path(tmp) / "server.log")
        model = (
            checkpoint.resolve().stem if checkpoint.suffix == ".safetensors" else checkpoint.resolve().name
        )
        print(f"server {url}, model {checkpoint}; {args.requests} requests, {args.min_tokens}-{args.max_tokens} "
              f"new tokens each, server threads {args.threads}", flush=True)  # fmt: skip
        try:
            return asyncio.run(asyncio.wait_for(bench(args, url, model), args.timeout))
        except TimeoutError:
            print(f"FAIL the load test did not finish within {args.timeout} s", flush=True)
            return 1
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
