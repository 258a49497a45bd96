"""Weight-only int8/int4 quantization with torchao, the quantized model directory, and the quantized
Hugging Face export loaded by transformers itself (TorchAoConfig, safetensors).

The model is the tiny recurrent HRMGemma of test_generate.py. Held-out loss against fp32 is measured on
the trained demo LM by bench/quantize_lm.py (docs/benchmarks.md), not here.
"""

from __future__ import annotations

import pytest
import torch
from test_generate import random_ids, recurrent_model

from hrm_mega.config import Config
from hrm_mega.inference.generate import generate

pytest.importorskip("torchao")

from hrm_mega.checkpoint.consolidate import load_model  # noqa: E402
from hrm_mega.checkpoint.model_dir import CheckpointError, read_safetensors  # noqa: E402
from hrm_mega.checkpoint.quantized import load_quantized, pack_int4, save_quantized, unpack_int4  # noqa: E402
from hrm_mega.convert.quantize import export_hf_quantized  # noqa: E402
from hrm_mega.models.quantize import QuantizeError, quantize_model, weight_bytes  # noqa: E402

BOUNDS = {"int8": 0.3, "int4": 0.2}


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, tmp_path_factory):
    scheme = request.param
    model = quantize_model(recurrent_model(seed=3), scheme)
    out = tmp_path_factory.mktemp(scheme)
    return scheme, model, save_quantized(model, Config(model=model.config), out / "model", scheme)


def test_the_quantized_directory_reloads_exactly_and_is_small(quantized) -> None:
    """The directory reloads to the same logits; it is small on disk, and int8 in memory. int4 loaded
    with pack_int4=True holds its Linear weights two per byte (ATen's layout: out features a multiple of
    16): the same logits within 1e-4 (equal on this CPU) and small in memory too."""
    scheme, model, directory = quantized
    fp32 = recurrent_model(seed=3)
    ids = random_ids(2, 9)
    loaded = load_model(directory)[0]  # what serve / generate / eval load
    with torch.no_grad():
        expected, _ = fp32.infer(ids)
        logits, _ = model.infer(ids)
        reloaded, _ = loaded.infer(ids)
    assert torch.equal(reloaded, logits)
    assert bool(torch.isfinite(logits).all()) and (logits - expected).abs().max() > 0  # quantized
    fp32_bytes = weight_bytes(fp32)
    stored = sum(
        t.numel() * t.element_size() for t in read_safetensors(directory / "model.safetensors")[0].values()
    )
    assert stored / fp32_bytes < BOUNDS[scheme] and weight_bytes(loaded) / fp32_bytes < 0.3
    if scheme == "int4":  # unpacked, int4 values sit one per int8 byte: over the bound in memory
        assert weight_bytes(loaded) / fp32_bytes > BOUNDS[scheme]
        packed = load_quantized(directory, pack_int4=True)[0]
        linears = [m for m in packed.modules() if type(m) is torch.nn.Linear]
        kinds = {(m.out_features % 16 == 0, type(m.weight).__name__) for m in linears}
        assert kinds == {(True, "Int4OpaqueTensor"), (False, "IntxUnpackedToInt8Tensor")}  # halting heads
        with torch.no_grad():
            assert (packed.infer(ids)[0] - logits).abs().max() <= 1e-4 * logits.abs().max()
        assert weight_bytes(packed) / fp32_bytes < BOUNDS[scheme]


def test_a_newer_quantized_format_is_refused_with_one_line(quantized, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from hrm_mega.checkpoint.integrity import write_checksums

    _, _, directory = quantized
    copy = tmp_path / "newer"
    copy.mkdir()
    for f in directory.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    meta = read_safetensors(copy / "model.safetensors")[1]
    save_file(
        load_file(copy / "model.safetensors"),
        copy / "model.safetensors",
        {**meta, "format": "hrm-mega/quantized/2"},
    )
    write_checksums(copy)
    with pytest.raises(
        CheckpointError,
        match=r"format version 2 is newer than this hrm-mega reads \(1\); upgrade hrm-mega to load it$",
    ):
        load_quantized(copy)


def test_int4_packing_round_trips_and_bad_shapes_are_one_line() -> None:
    q = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert pack_int4(q).shape == (5, 32) and torch.equal(unpack_int4(pack_int4(q)), q)
    with pytest.raises(QuantizeError, match="not a multiple of the int4 group size 32"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(48, 8)), "int4")
    with pytest.raises(QuantizeError, match="unknown quantization scheme 'int2'"):
        quantize_model(recurrent_model(seed=3), "int2")


def test_the_hf_export_loads_in_transformers_and_generates_our_greedy_tokens(quantized, tmp_path) -> None:
    """20 prompts: transformers' greedy generate (remote code, TorchAoConfig) equals ours token for token."""
    from transformers import AutoModelForCausalLM

    scheme = quantized[0]
    model = quantize_model(recurrent_model(seed=3, num_layers=4), scheme)  # one CycleBlock: a cheaper test
    out = export_hf_quantized(model, Config(model=model.config), tmp_path / "hf", scheme)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert "torchao" in str(hf.config.quantization_config.quant_method).lower()
    assert type(hf.model.embed_tokens.weight).__name__ == "IntxUnpackedToInt8Tensor"
    eos = hf.generation_config.eos_token_id
    for i in range(20):
        ids = random_ids(1, 2 + i % 5, seed=100 + i)
        ours = generate(model, ids, max_new_tokens=4, greedy=True, eos_id=eos)
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert theirs[0, ids.shape[1] :].tolist() == ours.tokens[0, : int(ours.lengths[0])].tolist(), i


def test_export_hf_quantize_is_the_quantize_commands_hf_export(tmp_path, capsys) -> None:
    """`export-hf --quantize` writes what `quantize --format hf` writes, and transformers loads it
    quantized; a flag it cannot honour is one line."""
    from transformers import AutoModelForCausalLM

    from hrm_mega.checkpoint.model_dir import save_model_dir
    from hrm_mega.entry import export_hf, quantize

    model = recurrent_model(seed=3, num_layers=4)
    ckpt = str(save_model_dir(model.state_dict(), Config(model=model.config), tmp_path / "model"))
    assert export_hf.main([ckpt, str(tmp_path / "a"), "--quantize", "int8"]) == 0
    assert quantize.main([ckpt, str(tmp_path / "b"), "--scheme", "int8", "--format", "hf"]) == 0
    a, b = (read_safetensors(tmp_path / d / "model.safetensors")[0] for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    assert "torchao" in str(hf.config.quantization_config.quant_method).lower()
    capsys.readouterr()
    assert export_hf.main([ckpt, str(tmp_path / "c"), "--quantize", "int4", "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "drop --dtype bf16" in err, err
