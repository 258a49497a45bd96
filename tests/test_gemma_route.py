"""The route of a user with a Gemma 3 checkpoint, end to end through the CLI entry points.

A tiny random Gemma3ForCausalLM with its own SentencePiece tokenizer.model (Gemma's special ids) is saved
as transformers saves it. Then: `import-hf` (exactly that Gemma 3), `prep text --tokenizer` with the
checkpoint's tokenizer, `train` from the imported weights with raised cycles, and `eval`, `generate` and
`export-hf` of the final training checkpoint, with nothing said about the tokenizer and (generate,
export) no dataset directory left at all: the checkpoint carries its tokenizer. Everything is fp32, on
the CPU, and nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_hf_interop import DATA_PREP_SPM, train_sentencepiece
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from hrm_mega.checkpoint.consolidate import load_model
from hrm_mega.entry import evaluate, export_hf, generate, import_hf
from hrm_mega.prep.cli import main as prep_main

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 384  # >= the tokenizer's pieces (its 256 byte-fallback pieces, specials and merges)
PROMPT = "12 + 7 = "


def tiny_gemma3(vocab_size: int, seed: int) -> Gemma3ForCausalLM:
    """8 layers in Gemma 3's own pattern (5 sliding + 1 full, then 2 sliding), every weight random."""
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
        max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norms included: no weight keeps a value that would hide a bug
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def run_ok(main, argv: list, capsys) -> str:
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def last_json(printed: str) -> dict:
    return json.loads(printed.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_gemma3_checkpoint_imports_trains_evaluates_generates_and_exports(tmp_path: Path, capsys) -> None:
    # 1. A Gemma 3 checkpoint directory as a user has it: config.json, model.safetensors, tokenizer.model.
    hf_dir = tmp_path / "gemma-3-tiny"
    hf_dir.mkdir()
    sp = train_sentencepiece(hf_dir / "tokenizer.model", **DATA_PREP_SPM)
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)  # Gemma's special ids
    assert sp.get_piece_size() <= VOCAB
    gemma = tiny_gemma3(VOCAB, seed=0)
    gemma.save_pretrained(hf_dir)
    assert (hf_dir / "model.safetensors").is_file()

    # 2. import-hf, with the H cycles raised: still exactly the Gemma 3 (the gates start at zero).
    model_dir = tmp_path / "models/hrm-tiny"
    printed = run_ok(import_hf.main, [hf_dir, model_dir, "--set", "model.h_cycles=2"], capsys)
    assert "1 CycleBlocks + 2 tail" in printed and "h_cycles=2" in printed
    assert (model_dir / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()
    imported, config = load_model(model_dir)
    assert (config.model.h_cycles, config.model.vocab_size) == (2, VOCAB)
    ids = torch.randint(3, sp.get_piece_size(), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = gemma(ids).logits
        assert expected.abs().max() > 1.0  # a comparison that means something
        assert (imported.eval()(ids)[0] - expected).abs().max() < 1e-4

    # 3. A text corpus, tokenized with the checkpoint's own tokenizer.
    corpus, data = tmp_path / "corpus", tmp_path / "data/text"
    assert prep_main(["corpus", "--out", str(corpus), "--docs", "200", "--seed", "0"]) == 0
    assert (
        prep_main(["text", "--input", str(corpus / "train.txt"), "--test-input", str(corpus / "test.txt"),
                   "--tokenizer", str(hf_dir / "tokenizer.model"), "--seq-len", "32", "--samples-per-shard", "8",
                   "--workers", "1", "--quiet", "--out", str(data)])
        == 0
    )  # fmt: skip
    assert (data / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()
    capsys.readouterr()

    # 4. Train from the imported weights, its config.yaml as the recipe (the checkpoint's own shape), with
    #    the H cycles raised once more: init_from takes any cycle counts, since they change no shape.
    run_dir = tmp_path / "runs/hrm-tiny"
    sets = [
        f"train.init_from={model_dir}", f"data.path={data}", "model.h_cycles=3", "train.steps=3",
        "train.global_batch=4", "train.precision=fp32", "train.eval_max_samples=8", "data.shuffle_buffer=8",
        "optim.lr=1e-3", "optim.warmup_steps=1", f"log.out_dir={run_dir}", "log.wandb=disabled",
        "log.log_interval=1", "log.progress_bar=false",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "hrm_mega.cli", "train", str(model_dir / "config.yaml")]
    cmd += [arg for s in sets for arg in ("--set", s)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses
    assert [r["cycles"] for r in records if "cycles" in r] == [3, 3, 3]
    logged = next(r for r in records if "eval/loss" in r)
    checkpoint = run_dir / "checkpoints/step-00000003"
    assert (checkpoint / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()

    # 5. eval, generate and export-hf of the checkpoint, told nothing about the tokenizer.
    (data / "tokenizer.model").rename(data / "tokenizer.model.away")
    argv = [checkpoint, "--data", data, "--max-samples", "8", "--device", "cpu"]
    result = last_json(run_ok(evaluate.main, argv, capsys))
    assert math.isfinite(result["loss"]) and 1 <= result["mean_cycles"] <= 3, result
    assert result["cycles"] == 3
    assert result["loss"] == pytest.approx(logged["eval/loss"], rel=1e-6)  # the run's own evaluation

    shutil.move(data, tmp_path / "elsewhere")  # from here on, no dataset directory at all
    argv = [checkpoint, "--prompt", PROMPT, "--max-new-tokens", "4", "--device", "cpu"]
    printed = run_ok(generate.main, argv, capsys)
    text, stats = printed.strip().rsplit("\n", 1)[0], last_json(printed)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT), printed
    assert stats["prompts"] == 1 and 1 <= stats["tokens"] <= 4 and stats["max_cycles"] == 3, stats

    out = tmp_path / "exports/hrm-tiny"
    printed = run_ok(export_hf.main, [checkpoint, out], capsys)
    assert f"tokenizer: {checkpoint / 'tokenizer.model'}" in printed
    # training opened the gates of the 3-cycle block: no longer exactly Gemma 3, so remote code
    assert json.loads((out / "config.json").read_text())["model_type"] == "hrm_mega"
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    trained, _ = load_model(checkpoint)
    with torch.no_grad():
        assert (hf(ids).logits - trained.eval()(ids)[0]).abs().max() < 1e-4
        # the exported model continues the prompt as `generate` did (greedy, over the tokenizer's pieces)
        prompt = [sp.bos_id(), *sp.encode(PROMPT)]
        unused = list(range(sp.get_piece_size(), VOCAB))
        continued = hf.generate(
            torch.tensor([prompt]), max_new_tokens=4, do_sample=False, suppress_tokens=unused
        )
    assert sp.decode(continued[0].tolist()) == text
    tokenizer = AutoTokenizer.from_pretrained(out)
    for sample in (PROMPT, "the sum of 31 and 14 is 45.", "Zürich 2024: ok?"):
        pieces = sp.encode(sample)
        assert tokenizer(sample, add_special_tokens=False).input_ids == pieces, sample
        assert tokenizer(sample).input_ids == [sp.bos_id(), *pieces], sample
        assert tokenizer.decode(pieces) == sp.decode(pieces)
