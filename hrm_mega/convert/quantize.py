"""Hugging Face export of a quantized HRMGemma (`hrm-mega quantize --format hf`).

The export is convert/hf_export.py's remote-code export with torchao's flattened tensors as its weights
and the matching TorchAoConfig in config.json; transformers (TorchAoHfQuantizer) rebuilds the same
quantized tensors from the safetensors file, so the loaded model computes what ours computes.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from hrm_mega.checkpoint.integrity import write_checksums
from hrm_mega.checkpoint.model_dir import WEIGHTS
from hrm_mega.config import Config
from hrm_mega.models.quantize import torchao_config


def export_hf_quantized(
    model: nn.Module, config: Config, out_dir: str | Path, scheme: str, tokenizer: str | Path | None = None
) -> Path:
    """A Hugging Face export (remote code, convert/hf_export.py) of a quantized HRMGemma: the weights are
    torchao's flattened tensors under `model.` and config.json carries the matching TorchAoConfig, so
    `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` rebuilds the same quantized
    tensors (transformers' TorchAoHfQuantizer) and computes what `model` computes."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from transformers import TorchAoConfig

    from hrm_mega.convert.hf_export import export_hf
    from hrm_mega.models import build_model

    out = Path(out_dir)
    shell = build_model(config.model)  # the files around the weights; its own weights are replaced below
    export_hf(shell, config, out, tokenizer=tokenizer, format="remote")
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    state = {f"model.{k}": v for k, v in model.state_dict().items() if not k.endswith((".cos", ".sin"))}
    flat, meta = flatten_tensor_state_dict(state)
    save_file({k: v.contiguous() for k, v in flat.items()}, out / WEIGHTS, metadata={**meta, "format": "pt"})
    hf_config = json.loads((out / "config.json").read_text())
    quant = TorchAoConfig(torchao_config(scheme), include_input_output_embeddings=True)
    hf_config["quantization_config"] = quant.to_dict()
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    write_checksums(out)
    return out
