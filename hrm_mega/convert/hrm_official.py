"""Import (and export) checkpoints of the official HRM training code.

The official script saves `model.state_dict()` of a torch.compile'd ACTLossHead, so every key starts
with `_orig_mod.model.inner.` (without torch.compile: `model.inner.`). Differences from our layout:

| official (after the prefix)                          | hrm-mega                                  |
|------------------------------------------------------|-------------------------------------------|
| embed_tokens.embedding_weight                        | embed_tokens.weight                       |
| embed_pos.embedding_weight                           | embed_pos                                 |
| puzzle_emb.weights  (a buffer)                       | puzzle_emb  (a buffer)                    |
| {H,L}_level.layers.i.self_attn.qkv_proj.weight       | cycle.{H,L}.layers.i.mixer.{q,k,v}_proj.weight (split by rows: q, k, v) |
| {H,L}_level.layers.i.self_attn.o_proj.weight         | cycle.{H,L}.layers.i.mixer.o_proj.weight  |
| {H,L}_level.layers.i.mlp.gate_up_proj.weight         | cycle.{H,L}.layers.i.mlp.{gate,up}_proj.weight (split by rows: gate, up) |
| {H,L}_level.layers.i.mlp.down_proj.weight            | cycle.{H,L}.layers.i.mlp.down_proj.weight |
| lm_head.weight, q_head.weight, q_head.bias, H_init, L_init | same names                          |

The file is read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers, so a checkpoint carrying pickled code is rejected instead of executed.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from hrm_mega.checkpoint.model_dir import CheckpointError, load_state_dict_strict, save_model_dir
from hrm_mega.config import Config
from hrm_mega.models.puzzle import RecursiveReasoner

PREFIXES = ("_orig_mod.model.inner.", "model.inner.", "inner.")
_RENAMES = {
    "embed_tokens.embedding_weight": "embed_tokens.weight",
    "embed_pos.embedding_weight": "embed_pos",
    "puzzle_emb.weights": "puzzle_emb",
}
_LAYER = re.compile(r"^(H|L)_level\.layers\.(\d+)\.(.+)$")


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """Loads an official checkpoint safely and strips its prefix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message spans many lines and suggests weights_only=False; name only the offending global
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it references {found.group(1)}" if found else "unsupported content"
        raise CheckpointError(
            f"{path}: refused to load, the file holds more than tensors ({reason})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in raw)), None)
    if prefix is None:
        raise CheckpointError(
            f"{path}: keys do not start with any of {', '.join(PREFIXES)}; not an HRM checkpoint"
        )
    return {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}


def from_official(official: dict[str, torch.Tensor], model: RecursiveReasoner) -> dict[str, torch.Tensor]:
    """Maps an official (prefix-stripped) state dict onto `model`'s keys, splitting fused projections."""
    c = model.config
    q_rows = c.num_heads * c.head_dim
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in official.items():
        m = _LAYER.match(key)
        if m is None:
            ours[_RENAMES.get(key, key)] = tensor
            continue
        level, index, rest = m.groups()
        base = f"cycle.{level}.layers.{index}."
        if rest == "self_attn.qkv_proj.weight":
            kv_rows = (tensor.shape[0] - q_rows) // 2
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
            ours |= {
                base + "mixer.q_proj.weight": q,
                base + "mixer.k_proj.weight": k,
                base + "mixer.v_proj.weight": v,
            }
        elif rest == "self_attn.o_proj.weight":
            ours[base + "mixer.o_proj.weight"] = tensor
        elif rest == "mlp.gate_up_proj.weight":
            gate, up = tensor.chunk(2, dim=0)
            ours |= {base + "mlp.gate_proj.weight": gate, base + "mlp.up_proj.weight": up}
        elif rest == "mlp.down_proj.weight":
            ours[base + "mlp.down_proj.weight"] = tensor
        else:
            raise CheckpointError(f"official key {key} has no counterpart in hrm-mega")
    return {k: v.float() for k, v in ours.items()}


def to_official(state: dict[str, torch.Tensor], prefix: str = PREFIXES[0]) -> dict[str, torch.Tensor]:
    """The inverse of from_official: our keys back to the official layout (fused q/k/v and gate/up)."""
    renames = {v: k for k, v in _RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    layer = re.compile(r"^cycle\.(H|L)\.layers\.(\d+)\.(.+)$")
    for key, tensor in state.items():
        m = layer.match(key)
        if m is None:
            out[prefix + renames.get(key, key)] = tensor
            continue
        level, index, rest = m.groups()
        base = f"{prefix}{level}_level.layers.{index}."
        if rest == "mixer.q_proj.weight":
            k, v = state[key.replace("q_proj", "k_proj")], state[key.replace("q_proj", "v_proj")]
            out[base + "self_attn.qkv_proj.weight"] = torch.cat([tensor, k, v], dim=0)
        elif rest == "mixer.o_proj.weight":
            out[base + "self_attn.o_proj.weight"] = tensor
        elif rest == "mlp.gate_proj.weight":
            out[base + "mlp.gate_up_proj.weight"] = torch.cat(
                [tensor, state[key.replace("gate", "up")]], dim=0
            )
        elif rest == "mlp.down_proj.weight":
            out[base + "mlp.down_proj.weight"] = tensor
    return out


def import_hrm(checkpoint: str | Path, out_dir: str | Path, config: Config) -> Path:
    """Reads an official HRM checkpoint, checks it against `config.model`, writes a model directory."""
    if config.model.family != "puzzle" or config.model.shared_net:
        raise CheckpointError("import-hrm needs a puzzle config with model.shared_net=false (an HRM recipe)")
    with torch.device("meta"):
        model = RecursiveReasoner(config.model)
    state = from_official(read_official(checkpoint), model)
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{checkpoint}: {key} has shape {tuple(tensor.shape)} but the config gives "
                f"{tuple(expected[key].shape)}; pass the config the checkpoint was trained with"
            )
    real = RecursiveReasoner(config.model)
    load_state_dict_strict(real, state, source=str(checkpoint))
    return save_model_dir(real.state_dict(), config, out_dir)
