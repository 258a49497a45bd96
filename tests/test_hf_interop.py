"""Hugging Face interop through the files and the pipelines, with transformers itself as the client.

import-hf (Gemma 3 directory -> HRMGemma), export-hf (plain Gemma3ForCausalLM when exact, remote code
otherwise, for HRMGemma and RecursiveReasoner), the exported tokenizer, and one-line errors. Every model
is tiny, random and built here; everything is fp32 and nothing is downloaded.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    SiglipVisionConfig,
)

import hrm_mega.config as hrm_config
from hrm_mega.checkpoint.consolidate import load_model
from hrm_mega.checkpoint.model_dir import save_model_dir
from hrm_mega.config import Config, DataConfig, LMModelConfig
from hrm_mega.convert import remote
from hrm_mega.convert.hf_gemma import hf_config_from
from hrm_mega.entry import export_hf, import_hf
from hrm_mega.inference.generate import generate
from hrm_mega.models.lm import HRMGemma
from hrm_mega.models.puzzle import RecursiveReasoner

SEQ = 12  # longer than the window (4): local and global layers see different keys
TOL = 1e-4


def lm_config(**overrides) -> LMModelConfig:
    """10 layers: two groups of 3 local + 1 global, then a tail of 2 local layers."""
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=10, num_heads=2, num_kv_heads=1,
        head_dim=32, query_pre_attn_scalar=24, sliding_window=4, local_per_global=3, rope_scaling=2.0,
        max_position=64,
    )  # fmt: skip
    return LMModelConfig(**{**fields, **overrides})


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter moved off its init (norms and gates included), so no weight goes untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


def random_gemma3(config: LMModelConfig, seed: int) -> Gemma3ForCausalLM:
    model = Gemma3ForCausalLM(hf_config_from(config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def hrm_gemma(tmp_path: Path, seed: int, *, open_gates: bool, **overrides) -> tuple[HRMGemma, Path]:
    """A random HRMGemma and the model directory it is saved in (what export-hf reads)."""
    config = lm_config(**overrides)
    model = perturbed(HRMGemma(config).init_weights(seed), seed)
    if not open_gates:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.rsplit(".", 1)[-1].startswith("gate_"):
                    p.zero_()
    ckpt = save_model_dir(model.state_dict(), Config(model=config), tmp_path / f"ckpt-{seed}")
    return model, ckpt


def token_ids(batch: int = 2, seed: int = 1, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_ok(main, argv: list, capsys) -> str:
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def greedy_reference(model: HRMGemma, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by repeated full forwards of our model."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat((ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


# --------------------------------------------------------------------------------------------------
# import-hf
# --------------------------------------------------------------------------------------------------


def test_import_hf_reads_a_saved_gemma3_and_gives_its_logits(tmp_path: Path, capsys) -> None:
    config = lm_config()
    hf = random_gemma3(config, seed=0)
    hf.save_pretrained(tmp_path / "hf")
    out = run_ok(import_hf.main, [tmp_path / "hf", tmp_path / "ours"], capsys)
    assert "2 CycleBlocks + 2 tail" in out
    model, loaded = load_model(tmp_path / "ours")
    assert loaded.model == config
    ids = token_ids()
    with torch.no_grad():
        expected = hf(ids).logits
        assert expected.abs().max() > 1.0  # a non-trivial comparison
        assert (model.eval()(ids)[0] - expected).abs().max() < TOL


def test_import_hf_reads_shards_and_raised_cycles_keep_the_logits(tmp_path: Path, capsys) -> None:
    config = lm_config(tie_embeddings=False)
    hf = random_gemma3(config, seed=1)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    argv = [tmp_path / "hf", tmp_path / "ours", "--set", "model.h_cycles=3", "--set", "model.l_cycles=2"]
    run_ok(import_hf.main, argv, capsys)
    model, loaded = load_model(tmp_path / "ours")
    assert (loaded.model.h_cycles, loaded.model.l_cycles, loaded.model.tie_embeddings) == (3, 2, False)
    ids = token_ids()
    with torch.no_grad():
        assert (model.eval()(ids)[0] - hf(ids).logits).abs().max() < TOL


def test_import_hf_takes_the_text_decoder_of_a_multimodal_gemma3(tmp_path: Path, capsys) -> None:
    text = hf_config_from(lm_config())
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        image_token_index=127, boi_token_index=125, eoi_token_index=126,
    )  # fmt: skip
    hf = Gemma3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    hf.save_pretrained(tmp_path / "hf")
    run_ok(import_hf.main, [tmp_path / "hf", tmp_path / "ours"], capsys)
    model, _ = load_model(tmp_path / "ours")
    ids = token_ids() % 125  # text only: no image tokens
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert (model.eval()(ids)[0] - expected).abs().max() < TOL


# --------------------------------------------------------------------------------------------------
# export-hf: plain Gemma 3
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cycles", "open_gates"),
    [((1, 1), True), ((2, 3), False)],  # exact: N = T = 1 (gates irrelevant), or zero gates
    ids=["single-cycle", "zero-gates"],
)
def test_exact_hrm_gemma_exports_as_plain_gemma3(tmp_path: Path, capsys, cycles, open_gates) -> None:
    model, ckpt = hrm_gemma(tmp_path, seed=2, open_gates=open_gates, h_cycles=cycles[0], l_cycles=cycles[1])
    out = tmp_path / "export"
    printed = run_ok(export_hf.main, [ckpt, out], capsys)
    assert "Gemma3ForCausalLM" in printed
    assert "nonzero HRM-only tensors" in printed  # the trained halting heads: said when left out
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["model_type"] == "gemma3_text" and hf_config["architectures"] == ["Gemma3ForCausalLM"]
    assert {"generation_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.py"))  # no code: transformers' own Gemma 3
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf) is Gemma3ForCausalLM
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, with positions counting real tokens
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=positions)[0]
        logits = hf(ids, attention_mask=mask, position_ids=positions).logits
    assert expected.abs().max() > 1.0
    assert (logits[mask.bool()] - expected[mask.bool()]).abs().max() < TOL


def test_plain_export_in_bf16_shards(tmp_path: Path, capsys) -> None:
    model, ckpt = hrm_gemma(tmp_path, seed=3, open_gates=False)
    out = tmp_path / "export"
    run_ok(export_hf.main, [ckpt, out, "--dtype", "bf16", "--max-shard-size", "100KB"], capsys)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    ids = token_ids()
    with torch.no_grad():
        ours = model.to(torch.bfloat16)(ids)[0].float()
        theirs = hf(ids).logits.float()
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()  # bf16 rounding, not a different model


# --------------------------------------------------------------------------------------------------
# export-hf: remote code
# --------------------------------------------------------------------------------------------------


def test_hrm_gemma_with_open_gates_exports_remote_code(tmp_path: Path, capsys) -> None:
    model, ckpt = hrm_gemma(tmp_path, seed=4, open_gates=True, h_cycles=2, l_cycles=2, value_head=True)
    out = tmp_path / "export"
    assert "trust_remote_code=True" in run_ok(export_hf.main, [ckpt, out], capsys)
    assert json.loads((out / "config.json").read_text())["model_type"] == "hrm_mega"
    assert {"lm.py", "modeling_hrm_mega.py", "configuration_hrm_mega.py"} <= {p.name for p in out.iterdir()}
    assert "hrm_mega" not in (out / "lm.py").read_text().split('"""', 2)[2]  # imports made relative
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = token_ids()
    with torch.no_grad():
        expected, aux = model(ids)
        got = hf(ids, labels=ids)
    assert (got.logits - expected).abs().max() < TOL
    assert (got.values - aux["values"]).abs().max() < TOL  # the value head came along
    ce = torch.nn.functional.cross_entropy(expected[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    assert abs(got.loss.item() - ce.item()) < TOL

    prompt = token_ids(seed=5, length=6)
    generated = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, greedy_reference(model, prompt, 8))
    # the same tokens as hrm-mega's own generation (KV cache), also with per-token halting and more cycles
    assert torch.equal(generated[:, 6:], generate(model, prompt, max_new_tokens=8, greedy=True).tokens)
    halting = {"max_cycles": 3, "halt_threshold": 0.5}
    ours = generate(model, prompt, max_new_tokens=8, greedy=True, **halting)
    assert 1 < ours.mean_cycles() < 3  # some tokens halt early, some run the extra cycle
    assert not torch.equal(ours.tokens, generated[:, 6:])  # so halting changes what is generated
    assert torch.equal(hf.generate(prompt, max_new_tokens=8, do_sample=False, **halting)[:, 6:], ours.tokens)
    # a left-padded batch generates what each row generates alone
    padded = torch.cat((torch.zeros(1, 2, dtype=torch.long), prompt[1:, :4]), dim=1)
    batch = torch.cat((prompt[:1], padded))
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    generated = hf.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[1, 2:], greedy_reference(model, prompt[1:, :4], 5)[0])


def test_remote_code_generate_decodes_against_a_kv_cache(tmp_path: Path, capsys) -> None:
    """generate() prefills once, then feeds the model one token per step (the cache holds the rest), and
    gives the tokens of recomputing the whole sequence (use_cache=False) and of hrm-mega's generation,
    with and without per-token halting, for a left-padded batch and under beam search."""
    import time

    model, ckpt = hrm_gemma(tmp_path, seed=21, open_gates=True, h_cycles=2, l_cycles=2)
    out = tmp_path / "export"
    run_ok(export_hf.main, [ckpt, out], capsys)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    fed = []  # positions each forward computed
    hf.register_forward_pre_hook(lambda _, args, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    prompt = token_ids(seed=22, length=7)
    padded = prompt.clone()
    mask = torch.ones_like(padded)
    padded[1, :3], mask[1, :3] = 0, 0  # row 1: a 4-token prompt, left-padded
    common = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    for halting in ({}, {"max_cycles": 3, "halt_threshold": 0.5}):
        fed.clear()
        cached = hf.generate(padded, **common, **halting)
        assert fed == [7] + [1] * 9  # the prompt once, then one position per new token
        fed.clear()
        recomputed = hf.generate(padded, **common, use_cache=False, **halting)
        assert fed == list(range(7, 17))
        assert torch.equal(cached, recomputed), halting
        ours = generate(model, padded, attention_mask=mask, max_new_tokens=10, greedy=True, **halting)
        assert torch.equal(cached[:, 7:], ours.tokens), halting
    out = hf.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.cache.length == 7 + 5  # the last token is sampled, never fed back
    beams = {"max_new_tokens": 6, "do_sample": False, "num_beams": 3, "num_return_sequences": 2}
    assert torch.equal(hf.generate(prompt, **beams), hf.generate(prompt, **beams, use_cache=False))

    long = token_ids(batch=1, seed=23, length=16)  # cost per token, printed: timings here are noisy
    runs = {"cache": [], "recompute": []}
    for _ in range(4):
        for name, use_cache in (("cache", True), ("recompute", False)):
            start = time.perf_counter()
            hf.generate(long, max_new_tokens=40, min_new_tokens=40, do_sample=False, use_cache=use_cache)
            runs[name].append((time.perf_counter() - start) / 40)
    best = {name: min(times) for name, times in runs.items()}
    print(f"remote generate, ms per token (16-token prompt, 40 new): cache {1e3 * best['cache']:.2f}, "
          f"recompute {1e3 * best['recompute']:.2f}, x{best['recompute'] / best['cache']:.2f}")  # fmt: skip


@pytest.mark.parametrize("puzzle_emb_ndim", [32, 0])  # 0: no puzzle-embedding table at all
def test_recursive_reasoner_exports_remote_code(tmp_path: Path, capsys, tiny_config, puzzle_emb_ndim) -> None:
    tiny_config = dataclasses.replace(tiny_config, puzzle_emb_ndim=puzzle_emb_ndim)
    model = perturbed(RecursiveReasoner(tiny_config).init_weights(0), seed=6)
    if model.puzzle_emb is not None:
        with torch.no_grad():
            model.puzzle_emb.normal_(generator=torch.Generator().manual_seed(7))
    ckpt = save_model_dir(model.state_dict(), Config(model=tiny_config), tmp_path / "ckpt")
    out = tmp_path / "export"
    printed = run_ok(export_hf.main, [ckpt, out], capsys)
    assert "RecursiveReasonerModel" in printed and "tokenizer" not in printed
    assert_only_the_model_config_is_shipped(sorted(out.glob("*.py")))
    assert json.loads((out / "config.json").read_text())["hrm_model"] == dataclasses.asdict(tiny_config)
    hf = AutoModel.from_pretrained(out, trust_remote_code=True)
    generator = torch.Generator().manual_seed(8)
    batch = {
        "inputs": torch.randint(0, tiny_config.vocab_size, (3, tiny_config.seq_len), generator=generator),
        "puzzle_identifiers": torch.tensor([0, 2, 1]),
    }
    carry = model.initial_carry(3)
    with torch.no_grad():
        got = hf(**batch)
        for segment in range(2):  # the carry handed back runs the next segment identically
            ours = model(carry, batch)
            assert (got.logits - ours.logits).abs().max() < TOL, segment
            assert (got.q_halt_logits - ours.q_halt).abs().max() < TOL
            assert (got.q_continue_logits - ours.q_continue).abs().max() < TOL
            assert (got.z_H - ours.carry.z_H).abs().max() < TOL
            carry = ours.carry
            got = hf(**batch, z_H=got.z_H, z_L=got.z_L)
    assert ours.logits.abs().max() > 0.1 and ours.q_halt.abs().max() > 0.1


def test_shipped_sources_import_each_other_relatively(tmp_path: Path) -> None:
    source = textwrap.dedent("""\
        from __future__ import annotations

        from typing import TYPE_CHECKING

        from hrm_mega import distributed
        from hrm_mega.models.layers import (
            RMSNorm,
            rms_norm as norm,
        )

        if TYPE_CHECKING:
            from hrm_mega.config.run import Config


        def lazy(config: Config):
            from hrm_mega.models.block import BlockStack  # only when called
            return BlockStack, distributed, RMSNorm, norm
        """)
    flat = {
        "hrm_mega.distributed": "distributed",
        "hrm_mega.models.layers": "layers",
        "hrm_mega.models.block": "block",
    }
    rewritten = remote.rewrite_imports(source, flat, where="example")
    assert "from . import distributed\n" in rewritten
    assert "from .layers import RMSNorm, rms_norm as norm\n" in rewritten
    assert "    from .block import BlockStack  # only when called\n" in rewritten
    assert "    pass  # type-only import of run (not shipped)\n" in rewritten  # annotations stay strings
    assert "hrm_mega" not in rewritten and "return BlockStack, distributed" in rewritten
    with pytest.raises(remote.ShippingError, match="needs `from __future__ import annotations`"):
        remote.rewrite_imports(
            source.replace("from __future__ import annotations\n", ""), flat, where="example"
        )
    with pytest.raises(remote.ShippingError, match="`import hrm_mega.models.lm` cannot be shipped"):
        remote.rewrite_imports("import hrm_mega.models.lm\n", flat, where="example")
    with pytest.raises(remote.ShippingError, match="takes a name from a package __init__"):
        remote.rewrite_imports("from hrm_mega.models import build_model\n", flat, where="example")

    shipped = remote.ship_model_code(tmp_path)  # the real closure, checked as transformers will load it
    assert {"lm.py", "puzzle.py", "layers.py", "model.py", "schema.py"} <= {f.name for f in shipped}
    assert "layout.py" not in {f.name for f in shipped}  # distributed.py imports it for annotations only
    assert_only_the_model_config_is_shipped(shipped)
    block = tmp_path / "block.py"
    block.write_text("import deepspeed\n" + block.read_text())
    with pytest.raises(remote.ShippingError, match="block.py imports deepspeed when it is imported"):
        remote.check_loadable(tmp_path, shipped)


def assert_only_the_model_config_is_shipped(shipped: list[Path]) -> None:
    """No shipped file defines or names a config section beyond the model's (run, RL, train, optim, ...)."""
    run_sections = {name for name in hrm_config.__all__ if name.endswith("Config")} - {
        "PuzzleModelConfig", "LMModelConfig",
    }  # fmt: skip
    assert {"Config", "RLConfig", "TrainConfig", "OptimConfig", "DataConfig"} <= run_sections
    for f in shipped:
        names = {n.id for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Name)}
        names |= {n.name for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.ClassDef)}
        assert not names & run_sections, (f.name, names & run_sections)
        assert "load_config" not in f.read_text() and "rl.rewards" not in f.read_text(), f.name


@pytest.mark.slow
def test_remote_exports_load_in_a_fresh_offline_process_without_hrm_mega(tmp_path: Path, tiny_config) -> None:
    """The exported code needs neither hrm-mega nor megatron/deepspeed: hrm_mega is made unimportable,
    and neither of the others may be imported while loading and running the models."""
    lm, lm_ckpt = hrm_gemma(tmp_path, seed=9, open_gates=True, h_cycles=2, l_cycles=2)
    puzzle = perturbed(RecursiveReasoner(tiny_config).init_weights(0), seed=10)
    puzzle_ckpt = save_model_dir(puzzle.state_dict(), Config(model=tiny_config), tmp_path / "puzzle")
    assert export_hf.main([str(lm_ckpt), str(tmp_path / "lm_export")]) == 0
    assert export_hf.main([str(puzzle_ckpt), str(tmp_path / "puzzle_export")]) == 0
    ids = token_ids(seed=11, length=5)
    generator = torch.Generator().manual_seed(12)
    batch = {
        "inputs": torch.randint(0, tiny_config.vocab_size, (2, tiny_config.seq_len), generator=generator),
        "puzzle_identifiers": torch.zeros(2, dtype=torch.long),
    }
    with torch.no_grad():
        expected = {
            "ids": ids,
            "lm_logits": lm(ids)[0],
            "generated": greedy_reference(lm, ids, 4),
            "inputs": batch["inputs"],
            "puzzle_logits": puzzle(puzzle.initial_carry(2), batch).logits,
        }
    save_file({k: v.contiguous() for k, v in expected.items()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        class NoHrmMega(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "hrm_mega":
                    raise ImportError("hrm_mega is not installed here")
        sys.meta_path.insert(0, NoHrmMega())
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForCausalLM
        e = load_file({str(tmp_path / "expected.safetensors")!r})
        lm = AutoModelForCausalLM.from_pretrained({str(tmp_path / "lm_export")!r}, trust_remote_code=True)
        puzzle = AutoModel.from_pretrained({str(tmp_path / "puzzle_export")!r}, trust_remote_code=True)
        with torch.no_grad():
            lm_diff = (lm(e["ids"]).logits - e["lm_logits"]).abs().max().item()
            generated = lm.generate(e["ids"], max_new_tokens=4, do_sample=False)
            puzzle_diff = (puzzle(e["inputs"]).logits - e["puzzle_logits"]).abs().max().item()
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"hrm_mega", "megatron", "deepspeed"}})
        print(json.dumps({{"lm": lm_diff, "puzzle": puzzle_diff, "loaded": loaded,
                          "generated": bool(torch.equal(generated, e["generated"]))}}))
    """)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lm"] < TOL and report["puzzle"] < TOL and report["generated"]
    assert report["loaded"] == []


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

TEXTS = [
    "12 + 345 = 357",
    "  two leading spaces, two  inside and trailing ",
    "line one\nline two\ttabbed",
    "unseen: Ωμέγα ☃ 東京 🙂",
    "",
]


def train_sentencepiece(path: Path, vocab_size: int = 320, **options) -> spm.SentencePieceProcessor:
    lines = [
        f"{a} + {b} = {a + b}. the sum of {a} and {b} is {a + b}." for a in range(40) for b in range(0, 90, 7)
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, hard_vocab_limit=False, minloglevel=2,
        **options,
    )  # fmt: skip
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


# The text data prep's settings (hrm_mega/prep/text.py), and SentencePiece's defaults with BPE.
DATA_PREP_SPM = dict(
    model_type="unigram", byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
    remove_extra_whitespaces=False, split_digits=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
)  # fmt: skip


@pytest.mark.parametrize("options", [DATA_PREP_SPM, dict(model_type="bpe")], ids=["data-prep", "bpe-default"])
def test_exported_tokenizer_encodes_like_sentencepiece(tmp_path: Path, capsys, options) -> None:
    sp = train_sentencepiece(tmp_path / "tokenizer.model", **options)
    model, ckpt = hrm_gemma(tmp_path, seed=12, open_gates=False, vocab_size=400)
    out = tmp_path / "export"
    printed = run_ok(export_hf.main, [ckpt, out, "--tokenizer", tmp_path / "tokenizer.model"], capsys)
    assert "tokenizer:" in printed
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in TEXTS:
        ids = sp.encode(text)
        assert tokenizer(text, add_special_tokens=False).input_ids == ids, text
        assert tokenizer(text).input_ids == [sp.bos_id(), *ids]  # <bos> first, as in training rows
        if sp.unk_id() not in ids:  # SentencePiece spells <unk> " ⁇ " when decoding, transformers "<unk>"
            assert tokenizer.decode(ids) == sp.decode(ids)
    generation = json.loads((out / "generation_config.json").read_text())
    expected = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()}
    assert {k: generation[k] for k in expected} == expected
    assert generation.get("pad_token_id") == (sp.pad_id() if sp.pad_id() >= 0 else None)


def test_export_finds_the_tokenizer_of_the_data_directory(tmp_path: Path, capsys) -> None:
    (tmp_path / "data").mkdir()
    train_sentencepiece(tmp_path / "data" / "tokenizer.model", **DATA_PREP_SPM)
    config = Config(model=lm_config(vocab_size=400), data=DataConfig(path=str(tmp_path / "data")))
    model = HRMGemma(config.model).init_weights(0)
    save_model_dir(model.state_dict(), config, tmp_path / "ckpt")
    assert "tokenizer:" in run_ok(export_hf.main, [tmp_path / "ckpt", tmp_path / "with"], capsys)
    assert (tmp_path / "with" / "tokenizer.json").is_file()
    (tmp_path / "data" / "tokenizer.model").unlink()
    assert "no tokenizer" in run_ok(export_hf.main, [tmp_path / "ckpt", tmp_path / "without"], capsys)
    assert not (tmp_path / "without" / "tokenizer.json").exists()


# --------------------------------------------------------------------------------------------------
# Bad input: one line, naming what is wrong
# --------------------------------------------------------------------------------------------------


def error_of(main, argv: list, capsys) -> str:
    capsys.readouterr()  # what came before (progress bars of save_pretrained)
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_import_hf_errors(tmp_path: Path, capsys) -> None:
    config = lm_config()
    hf_dir = tmp_path / "hf"
    random_gemma3(config, seed=13).save_pretrained(hf_dir)
    weights = load_file(hf_dir / "model.safetensors")

    assert "no config.json" in error_of(import_hf.main, [tmp_path, tmp_path / "o1"], capsys)
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "model_type='llama' is not Gemma 3" in error_of(import_hf.main, [other, tmp_path / "o2"], capsys)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(weights, pickled / "pytorch_model.bin")
    err = error_of(import_hf.main, [pickled, tmp_path / "o3"], capsys)
    assert "pytorch_model.bin: pickled weights are refused" in err

    missing = {k: v for k, v in weights.items() if k != "model.layers.3.mlp.up_proj.weight"}
    save_file(missing, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert "missing key model.layers.3.mlp.up_proj.weight" in error_of(
        import_hf.main, [hf_dir, tmp_path / "o4"], capsys
    )
    wrong = {**weights, "model.norm.weight": torch.zeros(3)}
    save_file(wrong, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert "model.norm.weight has shape (3,)" in error_of(import_hf.main, [hf_dir, tmp_path / "o5"], capsys)

    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00002.safetensors"}})
    )
    assert "lists model-00002.safetensors" in error_of(import_hf.main, [hf_dir, tmp_path / "o6"], capsys)
    err = error_of(import_hf.main, [hf_dir, tmp_path / "o7", "--set", "model.h_cycle=2"], capsys)
    assert "did you mean model.h_cycles" in err
    (tmp_path / "o8").mkdir()
    (tmp_path / "o8" / "keep").write_text("")
    assert "not an empty directory" in error_of(import_hf.main, [hf_dir, tmp_path / "o8"], capsys)
    assert not any(
        p.name.startswith("o") and p.name != "o8" for p in tmp_path.iterdir()
    )  # nothing half-written


def test_export_hf_errors(tmp_path: Path, capsys) -> None:
    model, ckpt = hrm_gemma(tmp_path, seed=14, open_gates=True, h_cycles=2)
    err = error_of(export_hf.main, [ckpt, tmp_path / "e1", "--format", "gemma3"], capsys)
    assert "cannot export as a plain Gemma3ForCausalLM" in err and "is nonzero" in err
    assert "no such file" in error_of(
        export_hf.main, [ckpt, tmp_path / "e2", "--tokenizer", tmp_path / "nope"], capsys
    )
    (tmp_path / "junk.model").write_bytes(b"\xff" * 64)
    err = error_of(export_hf.main, [ckpt, tmp_path / "e3", "--tokenizer", tmp_path / "junk.model"], capsys)
    assert "not a SentencePiece model" in err
    assert train_sentencepiece(tmp_path / "big.model", vocab_size=300, **DATA_PREP_SPM).vocab_size() > 128
    assert "do not fit model.vocab_size=128" in error_of(
        export_hf.main, [ckpt, tmp_path / "e4", "--tokenizer", tmp_path / "big.model"], capsys
    )
    assert "expected a training checkpoint" in error_of(
        export_hf.main, [tmp_path / "none", tmp_path / "e5"], capsys
    )
    assert "not an empty directory" in error_of(export_hf.main, [ckpt, ckpt], capsys)
    assert not any(p.name.startswith((".e", "e")) for p in tmp_path.iterdir())  # no partial exports left
