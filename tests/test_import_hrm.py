"""`hrm-mega import-hrm`: official HRM checkpoints into our model directory.

A synthetic checkpoint in the official layout (torch.compile prefix, fused qkv and gate_up, bf16 H/L init
buffers, as the official pretrain.py saves them) goes through the real CLI. Every tensor must land in its
place, and the imported model must compute the same function as a naive HRM forward written here
directly on the official tensors. Checkpoints carrying code are refused without running it.
"""

import math
import pickletools
import shlex
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from hrm_mega.checkpoint.model_dir import CheckpointError, load_model_dir
from hrm_mega.cli import main
from hrm_mega.config import load_config
from hrm_mega.convert.hrm_official import from_official, import_hrm, read_official, to_official
from hrm_mega.models.puzzle import RecursiveReasoner

PREFIX = "_orig_mod.model.inner."
# A tiny HRM: 2 heads of 16, puzzle embedding of 40 values padded into 2 prefix positions.
MODEL = dict(
    family="puzzle", vocab_size=11, seq_len=16, num_puzzle_identifiers=3, hidden_size=32, num_heads=2,
    expansion=4.0, h_layers=1, l_layers=2, h_cycles=2, l_cycles=2, puzzle_emb_ndim=40,
)  # fmt: skip
INTER = 256  # round(4 * 32 * 2/3) = 85, rounded up to a multiple of 256
PREFIX_LEN = 2  # ceil(40 / 32)


def official_state(hidden: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official key names and shapes, with the torch.compile prefix."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    v, heads = MODEL["vocab_size"], MODEL["num_heads"]
    sd = {
        "embed_tokens.embedding_weight": t(v, hidden, scale=hidden**-0.5),
        "lm_head.weight": t(v, hidden, scale=hidden**-0.5),
        "q_head.weight": t(2, hidden, scale=0.1),
        "q_head.bias": t(2),
        "puzzle_emb.weights": t(MODEL["num_puzzle_identifiers"], MODEL["puzzle_emb_ndim"], scale=0.5),
        # the official model keeps these two buffers in its forward dtype, bf16
        "H_init": t(hidden).to(torch.bfloat16),
        "L_init": t(hidden).to(torch.bfloat16),
    }
    for level, n in (("H", MODEL["h_layers"]), ("L", MODEL["l_layers"])):
        for i in range(n):
            base = f"{level}_level.layers.{i}."
            sd[base + "self_attn.qkv_proj.weight"] = t(
                3 * heads * (hidden // heads), hidden, scale=hidden**-0.5
            )
            sd[base + "self_attn.o_proj.weight"] = t(hidden, hidden, scale=hidden**-0.5)
            sd[base + "mlp.gate_up_proj.weight"] = t(2 * INTER, hidden, scale=hidden**-0.5)
            sd[base + "mlp.down_proj.weight"] = t(hidden, INTER, scale=INTER**-0.5)
    return {PREFIX + k: v for k, v in sd.items()}


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = official_state()
    path = tmp_path / "step_26040"
    torch.save(sd, path)
    return path, {k[len(PREFIX) :]: v for k, v in sd.items()}


def write_config(tmp_path: Path, **model) -> Path:
    path = tmp_path / "hrm_tiny.yaml"
    path.write_text(yaml.safe_dump({"model": {**MODEL, **model}}))
    return path


def run_cli(*argv) -> int:
    return main(["import-hrm", *map(str, argv)])


# --------------------------------------------------------------------------------------------------
# The mapping
# --------------------------------------------------------------------------------------------------


def test_every_tensor_lands_in_its_place(tmp_path, checkpoint, capsys):
    path, off = checkpoint
    out = tmp_path / "imported"
    assert run_cli(path, out, "--config", write_config(tmp_path)) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    model, config = load_model_dir(out)
    assert config.model.hidden_size == 32 and config.model.l_layers == 2
    ours = model.state_dict()

    expected = {
        "embed_tokens.weight": off["embed_tokens.embedding_weight"],
        "puzzle_emb": off["puzzle_emb.weights"],
        "lm_head.weight": off["lm_head.weight"],
        "q_head.weight": off["q_head.weight"],
        "q_head.bias": off["q_head.bias"],
        "H_init": off["H_init"].float(),
        "L_init": off["L_init"].float(),
    }
    rows = MODEL["hidden_size"]  # num_heads * head_dim: the q, k and v blocks of the fused weight
    for level, n in (("H", 1), ("L", 2)):
        for i in range(n):
            src, dst = f"{level}_level.layers.{i}.", f"cycle.{level}.layers.{i}."
            qkv, gate_up = off[src + "self_attn.qkv_proj.weight"], off[src + "mlp.gate_up_proj.weight"]
            expected |= {
                dst + "mixer.q_proj.weight": qkv[:rows],
                dst + "mixer.k_proj.weight": qkv[rows : 2 * rows],
                dst + "mixer.v_proj.weight": qkv[2 * rows :],
                dst + "mixer.o_proj.weight": off[src + "self_attn.o_proj.weight"],
                dst + "mlp.gate_proj.weight": gate_up[:INTER],
                dst + "mlp.up_proj.weight": gate_up[INTER:],
                dst + "mlp.down_proj.weight": off[src + "mlp.down_proj.weight"],
            }
    assert set(ours) == set(expected)  # nothing left over, nothing invented
    for key, want in expected.items():
        assert ours[key].dtype == torch.float32, key
        assert torch.equal(ours[key], want), key


def test_to_official_inverts_from_official(checkpoint):
    path, off = checkpoint
    with torch.device("meta"):
        model = RecursiveReasoner(load_config(None, [f"model.{k}={v}" for k, v in MODEL.items()]).model)
    ours = from_official(read_official(path), model)
    back = to_official(ours)
    assert set(back) == {PREFIX + k for k in off}
    for key, tensor in off.items():
        assert torch.equal(back[PREFIX + key], tensor.float()), key
    # and without the torch.compile prefix
    assert set(to_official(ours, prefix="model.inner.")) == {"model.inner." + k for k in off}


# --------------------------------------------------------------------------------------------------
# The imported model computes the official function
# --------------------------------------------------------------------------------------------------


def official_forward(sd: dict[str, torch.Tensor], inputs, puzzle_ids, h_cycles: int, l_cycles: int):
    """HRM-ACT-v1 inner forward, written directly on the official tensors (fp32, no autograd tricks).
    Without puzzle_emb.weights (puzzle_emb_ndim 0) there is no prefix, as in HRM."""
    h, heads, eps = MODEL["hidden_size"], MODEL["num_heads"], 1e-5
    d = h // heads
    prefix_len = PREFIX_LEN if "puzzle_emb.weights" in sd else 0
    b, n = inputs.shape[0], MODEL["seq_len"] + prefix_len

    def rms(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    angles = torch.arange(n, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # [n, d]

    def rope(x):  # x: [b, n, heads, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]

    def block(x, p):
        qkv = (x @ sd[p + "self_attn.qkv_proj.weight"].T).view(b, n, 3 * heads, d)
        q, k, v = rope(qkv[:, :, :heads]), rope(qkv[:, :, heads : 2 * heads]), qkv[:, :, 2 * heads :]
        probs = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(d**-0.5).softmax(-1)  # bidirectional
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, h)
        x = rms(x + attn @ sd[p + "self_attn.o_proj.weight"].T)  # post-norm, weightless
        gate, up = (x @ sd[p + "mlp.gate_up_proj.weight"].T).chunk(2, -1)
        return rms(x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T)

    def level(name, hidden, injection, layers):
        hidden = hidden + injection
        for i in range(layers):
            hidden = block(hidden, f"{name}_level.layers.{i}.")
        return hidden

    x = sd["embed_tokens.embedding_weight"][inputs]
    if prefix_len:
        pe = F.pad(sd["puzzle_emb.weights"][puzzle_ids], (0, prefix_len * h - MODEL["puzzle_emb_ndim"]))
        x = torch.cat((pe.view(b, prefix_len, h), x), 1)
    x = math.sqrt(h) * x
    z_H = sd["H_init"].float().expand(b, n, h)
    z_L = sd["L_init"].float().expand(b, n, h)
    for _ in range(h_cycles):
        for _ in range(l_cycles):
            z_L = level("L", z_L, z_H + x, MODEL["l_layers"])
        z_H = level("H", z_H, z_L, MODEL["h_layers"])
    q = z_H[:, 0] @ sd["q_head.weight"].T + sd["q_head.bias"]
    return (z_H @ sd["lm_head.weight"].T)[:, prefix_len:], q[:, 0], q[:, 1]


@pytest.mark.parametrize("cycles", [(1, 1), (2, 3)])
def test_imported_model_computes_the_official_forward(tmp_path, checkpoint, cycles):
    path, off = checkpoint
    n, t = cycles
    out = tmp_path / "imported"
    config = write_config(tmp_path)
    assert (
        run_cli(path, out, "--config", config, "--set", f"model.h_cycles={n}", "--set", f"model.l_cycles={t}")
        == 0
    )
    model, _ = load_model_dir(out)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, MODEL["vocab_size"], (3, MODEL["seq_len"]), generator=g)
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        got = model(model.initial_carry(3), {"inputs": inputs, "puzzle_identifiers": ids})
    logits, q_halt, q_cont = official_forward(off, inputs, ids, n, t)
    torch.testing.assert_close(got.logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.q_halt, q_halt, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.q_continue, q_cont, rtol=1e-4, atol=1e-4)
    # guard: a different cycle count is a different function, so the comparison above is sharp
    other, _, _ = official_forward(off, inputs, ids, n + 1, t)
    assert not torch.allclose(got.logits, other, atol=1e-3)


def test_checkpoint_without_puzzle_embedding_imports_and_exports(tmp_path):
    """HRM with puzzle_emb_ndim 0 saves no puzzle_emb.weights: our model has no table either, computes
    the official forward, and exports back to the same keys."""
    sd = {k: v for k, v in official_state().items() if not k.endswith("puzzle_emb.weights")}
    path, out = tmp_path / "step_1", tmp_path / "imported"
    torch.save(sd, path)
    assert run_cli(path, out, "--config", write_config(tmp_path, puzzle_emb_ndim=0)) == 0
    model, _ = load_model_dir(out)
    assert model.puzzle_emb is None and "puzzle_emb" not in model.state_dict()
    off = {k[len(PREFIX) :]: v for k, v in sd.items()}
    inputs = torch.randint(
        0, MODEL["vocab_size"], (3, MODEL["seq_len"]), generator=torch.Generator().manual_seed(1)
    )
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        got = model(model.initial_carry(3), {"inputs": inputs, "puzzle_identifiers": ids})
    logits, q_halt, _ = official_forward(off, inputs, ids, MODEL["h_cycles"], MODEL["l_cycles"])
    torch.testing.assert_close(got.logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.q_halt, q_halt, rtol=1e-4, atol=1e-4)
    assert set(to_official(model.state_dict())) == set(sd)


# --------------------------------------------------------------------------------------------------
# Refusals: one line, nothing executed, nothing written
# --------------------------------------------------------------------------------------------------


class Opaque:
    """A custom class: unpickling it means importing and running code from this module."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


class Exploit:
    """Unpickling runs os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def write_hostile(kind: str, path: Path, marker: Path) -> None:
    touch = f"touch {shlex.quote(str(marker))}"
    tensors = {k: v for k, v in list(official_state().items())[:3]}
    if kind == "custom_class":
        torch.save({**tensors, PREFIX + "extra": Opaque()}, path)
    elif kind == "reduce_exploit":
        torch.save({**tensors, PREFIX + "extra": Exploit(touch)}, path)
    elif kind == "raw_global_pickle":
        # protocol-0 pickle by hand: GLOBAL os.system, MARK, the command, TUPLE, REDUCE, STOP
        path.write_bytes(b"cos\nsystem\n(V" + touch.encode() + b"\ntR.")
    elif kind == "zip_with_hostile_data_pkl":
        # a well-formed torch zip checkpoint whose data.pkl is replaced by the hand-made pickle
        torch.save(tensors, path)
        with zipfile.ZipFile(path) as z:
            members = {i.filename: z.read(i) for i in z.infolist()}
        data_pkl = next(name for name in members if name.endswith("/data.pkl"))
        members[data_pkl] = b"cos\nsystem\n(V" + touch.encode() + b"\ntR."
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for name, data in members.items():
                z.writestr(name, data)


HOSTILE = ["custom_class", "reduce_exploit", "raw_global_pickle", "zip_with_hostile_data_pkl"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_checkpoint_carrying_code_is_refused_and_not_run(tmp_path, kind, capsys):
    path, marker, out = tmp_path / "evil.pt", tmp_path / "pwned", tmp_path / "imported"
    write_hostile(kind, path, marker)
    config = write_config(tmp_path)

    with pytest.raises(CheckpointError) as e:
        import_hrm(path, out, load_config(config))
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "refused" in message
    assert ("Opaque" if kind == "custom_class" else "system") in message  # names the offending global
    assert "\x1b" not in message  # no terminal escape codes from torch's own message

    assert run_cli(path, out, "--config", config) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.count("\n") == 1 and "import-hrm: error:" in captured.err and "refused" in captured.err
    )
    assert not marker.exists()  # the payload never ran
    assert not out.exists()


def _pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["reduce_exploit", "raw_global_pickle", "zip_with_hostile_data_pkl"])
def test_hostile_payloads_really_carry_code(tmp_path, kind):
    """Guard for the refusal test, by static inspection (nothing is unpickled): each payload imports
    os.system (GLOBAL or STACK_GLOBAL) and calls it (REDUCE) with the marker-writing command."""
    path, marker = tmp_path / f"{kind}.pt", tmp_path / f"{kind}.ran"
    write_hostile(kind, path, marker)
    ops = list(pickletools.genops(_pickle_bytes(path)))
    names = [op.name for op, _, _ in ops]
    strings = [str(arg) for _, arg, _ in ops if isinstance(arg, str)]
    imports_system = any(s in ("os system", "posix system") for s in strings) or (
        "STACK_GLOBAL" in names and "system" in strings and any(s in ("os", "posix") for s in strings)
    )
    assert imports_system and "REDUCE" in names
    assert any(str(marker) in s for s in strings)


def test_shape_mismatch_names_the_key(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    out = tmp_path / "imported"
    config = write_config(tmp_path, hidden_size=64, puzzle_emb_ndim=40)
    with pytest.raises(CheckpointError) as e:
        import_hrm(path, out, load_config(config))
    message = str(e.value)
    assert "\n" not in message
    key = message.split(": ")[1].split(" ")[0]
    with torch.device("meta"):
        expected = RecursiveReasoner(load_config(config).model).state_dict()
    assert key in expected  # a real parameter name of our model
    assert f"{tuple(expected[key].shape)}" in message  # ...with the shape the config implies
    assert "has shape" in message and "config" in message

    assert run_cli(path, out, "--config", config) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err
    assert not out.exists()


def test_missing_file_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope" / "step_1"
    assert run_cli(missing, tmp_path / "out", "--config", write_config(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "no such checkpoint file" in err


def test_other_bad_checkpoints(tmp_path, checkpoint):
    path, off = checkpoint
    config = load_config(write_config(tmp_path))
    cases = {
        "not_a_state_dict": ([torch.zeros(2)], "expected a flat state dict of tensors"),
        "wrong_prefix": ({"encoder.weight": torch.zeros(2)}, "not an HRM checkpoint"),
        "missing_key": (
            {PREFIX + k: v for k, v in off.items() if k != "q_head.bias"},
            "missing key q_head.bias",
        ),
        "unknown_layer_key": (
            {
                **{PREFIX + k: v for k, v in off.items()},
                PREFIX + "H_level.layers.0.extra.weight": torch.zeros(1),
            },
            "H_level.layers.0.extra.weight",
        ),
    }
    for name, (content, fragment) in cases.items():
        bad = tmp_path / f"{name}.pt"
        torch.save(content, bad)
        with pytest.raises(CheckpointError) as e:
            import_hrm(bad, tmp_path / name, config)
        assert fragment in str(e.value) and "\n" not in str(e.value), name
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        import_hrm(garbage, tmp_path / "g", config)
