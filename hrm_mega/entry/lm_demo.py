"""`make demo-lm`: the HRMGemma path end to end on the CPU, on a three-source data mixture.

Builds three text datasets with one tokenizer (configs/lm/hrmgemma_mix_tiny.yaml says what they hold):
plain algorithmic text, arithmetic as prompt/answer records, and easy sudokus as text. Trains the tiny
HRMGemma on the weighted mixture on DeepSpeed, evaluates every source's held-out split (loss, and the
answers' exact match where the source has answers) at the trained cycles and at raised cycles, and
greedily completes a few prompts with `max_cycles` at and above the trained value. Every stage is the
real one (the same code as `hrm-mega prep`, `train`, `eval` and `generate`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from hrm_mega.entry.common import demo_config, run_main
from hrm_mega.entry.plot import plot_run
from hrm_mega.resources import recipe

RECIPE = recipe("lm/hrmgemma_mix_tiny.yaml")
PROMPTS = ["12+35=", "reverse: abcd ->", "sort: 4 1 3 ->", "7*8="]
SEQ_LEN = 128


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm_mega.entry.lm_demo", description=__doc__)
    p.add_argument("--data", default="data/lm-mix", help="the mixture's directory (built if missing)")
    p.add_argument("--out", default="runs/demo-lm", help="run directory (a fresh run each time)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def build_commands(root: Path, vocab_size: int) -> list[list[str]]:
    """The `hrm_mega.prep` command lines that build the three sources under root (one tokenizer)."""
    qa = ["--prompt-field", "prompt", "--answer-field", "answer"]
    tokenizer = str(root / "tokenizer.model")

    def text(name: str, corpus: Path, suffix: str, *fields: str) -> list[str]:
        return ["text", "--input", str(corpus / f"train.{suffix}"), "--test-input", str(corpus / f"test.{suffix}"),
                *fields, "--tokenizer", tokenizer, "--seq-len", str(SEQ_LEN), "--out", str(root / name),
                "--samples-per-shard", "128", "--seed", "0", "--overwrite"]  # fmt: skip

    src = root / "src"
    return [
        ["corpus", "--out", str(src / "text"), "--docs", "20000", "--seed", "0",
         "--tasks", "reverse,copy,sort,count,parity", "--overwrite"],
        ["corpus", "--out", str(src / "arithmetic"), "--docs", "20000", "--seed", "1", "--tasks", "add,sub,mul",
         "--format", "jsonl", "--overwrite"],
        ["sudoku", "--out", str(src / "sudoku"), "--train", "3000", "--test", "500", "--min-givens", "76",
         "--max-givens", "80", "--seed", "0", "--overwrite", "--quiet"],
        ["puzzle-text", "--puzzles", str(src / "sudoku"), "--out", str(src / "sudoku-jsonl"), "--answer", "blanks",
         "--overwrite"],
        ["tokenizer", "--input", str(src / "text/train.txt"), str(src / "arithmetic/train.jsonl"),
         str(src / "sudoku-jsonl/train.jsonl"), *qa, "--vocab-size", str(vocab_size), "--out", tokenizer],
        text("text", src / "text", "txt"),
        text("arithmetic", src / "arithmetic", "jsonl", *qa),
        text("sudoku", src / "sudoku-jsonl", "jsonl", *qa),
    ]  # fmt: skip


def build_mixture(root: Path, vocab_size: int) -> bool:
    """Runs build_commands unless the last dataset exists; False when a step fails (it printed why)."""
    from hrm_mega.prep.cli import main as prep_main

    if (root / "sudoku/manifest.json").is_file():
        return True
    for command in build_commands(root, vocab_size):
        print(f"[demo-lm] python -m hrm_mega.prep {' '.join(command)}", flush=True)
        if prep_main(command) != 0:
            return False
    return True


def run(args: argparse.Namespace) -> int:
    from hrm_mega.config import read_config

    root = Path(args.data)
    t0 = time.perf_counter()
    recipe_config = read_config(RECIPE, args.overrides)  # the data does not exist yet: no checks
    if not build_mixture(root, recipe_config.model.vocab_size):
        return 2
    t_data = time.perf_counter() - t0
    # the recipe's sources, under --data (each source's directory is named after it)
    sources = [
        {"path": str(root / s.name), "weight": s.weight, "name": s.name} for s in recipe_config.data.sources
    ]
    overrides = [f"data.sources={json.dumps(sources)}", *args.overrides]
    config = demo_config(
        RECIPE, argparse.Namespace(data=str(root / "text"), out=args.out, overrides=overrides)
    )

    shutil.rmtree(args.out, ignore_errors=True)
    from hrm_mega.training.tasks.lm import evaluate_lm
    from hrm_mega.training.trainer import build_trainer

    print(f"[demo-lm] training {RECIPE.name} for {config.train.steps} steps on the CPU", flush=True)
    t1 = time.perf_counter()
    trainer = build_trainer(config, resume="none")
    trained = trainer.train()
    t_train = time.perf_counter() - t1

    model, cycles = trainer.model, config.model.h_cycles
    rows = []
    for source in config.data.sources:
        rows.append((source.name, cycles, trained[f"eval/{source.name}/loss"],
                     trained.get(f"eval/{source.name}/answer_exact"), trained[f"eval/{source.name}/mean_cycles"]))  # fmt: skip
        own = replace(config, data=replace(config.data, path=source.path, sources=[]))
        for more in (cycles + 1, cycles + 2):
            m = evaluate_lm(model, own, trainer.world, trainer.ema, cycles=more)
            rows.append((source.name, more, m["loss"], m.get("answer_exact"), m["mean_cycles"]))
    samples = complete_prompts(trainer, root / "text", cycles)
    print_report(rows, samples, t_data, t_train, config.train.steps)
    report = {"eval": rows, "samples": samples, "seconds": [t_data, t_train]}
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


def print_report(rows, samples, t_data: float, t_train: float, steps: int) -> None:
    print()
    print("HRMGemma tiny on a three-source mixture (held-out test splits; loss on answers where they exist)")
    print(f"{'source':<12} {'H cycles':>8} {'loss (nats)':>11} {'answer exact':>12} {'mean cycles':>12}")
    for name, cycles, loss, exact, mean_cycles in rows:
        shown = "-" if exact is None else f"{100 * exact:.1f}%"
        print(f"{name:<12} {cycles:>8} {loss:>11.3f} {shown:>12} {mean_cycles:>12.2f}")
    print("\ngreedy completions (max_cycles: prompt -> completion)")
    for prompt, max_cycles, completion, _ in samples:
        print(f"  {max_cycles}: {prompt!r} -> {completion!r}")
    print(f"data build {t_data:.0f} s, training {t_train:.0f} s ({steps} steps, CPU)", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_main("demo-lm", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
