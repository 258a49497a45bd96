"""`make demo-lm`: the HRMGemma path end to end on the CPU.

Generates the arithmetic/algorithmic corpus, builds a SentencePiece-tokenized packed text dataset,
trains `configs/lm/hrmgemma_tiny.yaml` on DeepSpeed, evaluates held-out loss against the unigram
baseline at the trained cycles and at raised cycles, and greedily completes a few prompts with
`max_cycles` at and above the trained value. Every stage is the real one (the same code as
`hrm-mega prep`, `train`, `eval` and `generate`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from hrm_mega.entry.common import build_dataset, demo_config, run_main
from hrm_mega.entry.plot import plot_run
from hrm_mega.resources import recipe

RECIPE = recipe("lm/hrmgemma_tiny.yaml")
PROMPTS = ["12+35=", "reverse: abcd ->", "sort: 4 1 3 ->", "7*8="]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm_mega.entry.lm_demo", description=__doc__)
    p.add_argument("--data", default="data/arith-text", help="text dataset directory (built if missing)")
    p.add_argument("--out", default="runs/demo-lm", help="run directory (a fresh run each time)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def run(args: argparse.Namespace) -> int:
    data = Path(args.data)
    config = demo_config(RECIPE, args)
    t0 = time.perf_counter()
    corpus = data.parent / f"{data.name}-corpus"
    steps = [
        ["corpus", "--out", str(corpus), "--docs", "20000", "--seed", "0", "--overwrite"],
        ["text", "--input", str(corpus / "train.txt"), "--test-input", str(corpus / "test.txt"),
         "--vocab-size", str(config.model.vocab_size), "--seq-len", "128", "--out", str(data),
         "--samples-per-shard", "256", "--seed", "0"],
    ]  # fmt: skip
    if not build_dataset(data, steps, "[demo-lm] "):
        return 2
    t_data = time.perf_counter() - t0

    shutil.rmtree(args.out, ignore_errors=True)
    from hrm_mega.training.tasks.lm import evaluate_lm
    from hrm_mega.training.trainer import build_trainer

    print(f"[demo-lm] training {RECIPE.name} for {config.train.steps} steps on the CPU", flush=True)
    t1 = time.perf_counter()
    trainer = build_trainer(config, resume="none")
    trained = trainer.train()
    t_train = time.perf_counter() - t1

    model, cycles = trainer.model, config.model.h_cycles
    rows = [(f"held-out, {cycles} cycles (trained)", trained["eval/loss"], trained["eval/mean_cycles"])]
    for more in (cycles + 1, cycles + 2):
        m = evaluate_lm(model, config, trainer.world, trainer.ema, cycles=more)
        rows.append((f"held-out, {more} cycles (raised)", m["loss"], m["mean_cycles"]))
    baseline = trained["eval/unigram_baseline"]
    samples = complete_prompts(trainer, data, cycles)
    print_report(rows, baseline, samples, t_data, t_train, config.train.steps)
    report = {"baseline": baseline, "eval": rows, "samples": samples, "seconds": [t_data, t_train]}
    (Path(args.out) / "demo_results.json").write_text(json.dumps(report, indent=2))
    print(f"training curves: {plot_run(Path(args.out), Path(args.out) / 'metrics.png')}")
    return 0


def complete_prompts(trainer, data: Path, cycles: int) -> list[tuple[str, int, str, float]]:
    """Greedy completions of PROMPTS at the trained cycles and two above (with the EMA weights, if any)."""
    import contextlib

    import sentencepiece as spm
    import torch

    from hrm_mega.data.shards import TOKENIZER_FILE
    from hrm_mega.inference.generate import generate, left_pad

    tokenizer = spm.SentencePieceProcessor(model_file=str(data / TOKENIZER_FILE))
    bos, eos = tokenizer.bos_id(), tokenizer.eos_id()
    ids, mask = left_pad([[bos, *tokenizer.encode(p)] for p in PROMPTS], pad_id=tokenizer.pad_id())
    out = []
    model = trainer.model.eval()
    with trainer.ema.swapped(model) if trainer.ema is not None else contextlib.nullcontext(), torch.no_grad():
        for max_cycles in (cycles, cycles + 2):
            gen = generate(model, ids, attention_mask=mask, max_new_tokens=12, max_cycles=max_cycles,
                           greedy=True, eos_id=eos, pad_id=tokenizer.pad_id(),
                           vocab_limit=tokenizer.get_piece_size())  # fmt: skip
            for prompt, tokens, n in zip(PROMPTS, gen.tokens.tolist(), gen.lengths.tolist()):
                completion = tokenizer.decode([t for t in tokens[:n] if t != eos])
                out.append((prompt, max_cycles, completion, float(gen.mean_cycles())))
    return out


def print_report(rows, baseline: float, samples, t_data: float, t_train: float, steps: int) -> None:
    print()
    print("HRMGemma tiny on the generated arithmetic/algorithmic corpus (held-out test split)")
    print(f"{'evaluation':<34} {'loss (nats)':>11} {'ppl':>8} {'mean cycles':>12}")
    print(f"{'unigram baseline':<34} {baseline:>11.3f} {2.718281828**baseline:>8.2f} {'-':>12}")
    for name, loss, cycles in rows:
        print(f"{name:<34} {loss:>11.3f} {2.718281828**loss:>8.2f} {cycles:>12.2f}")
    print("\ngreedy completions (max_cycles: prompt -> completion)")
    for prompt, max_cycles, completion, _ in samples:
        print(f"  {max_cycles}: {prompt!r} -> {completion!r}")
    print(f"data build {t_data:.0f} s, training {t_train:.0f} s ({steps} steps, CPU)", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_main("demo-lm", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
