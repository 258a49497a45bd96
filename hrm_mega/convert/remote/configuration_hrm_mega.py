"""Hugging Face config of an hrm-mega model exported with its own modeling code (trust_remote_code).

`hrm_model` is the `model:` section of the hrm-mega recipe, verbatim; it alone decides the model. The
other fields mirror a few of its values under the names transformers' utilities look for.

This file is shipped inside the export by `hrm-mega export-hf` (and is importable from hrm_mega too:
it imports nothing from the model code).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

# hrm-mega field -> the transformers name it is mirrored under
MIRRORED = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "num_layers": "num_hidden_layers",
    "max_position": "max_position_embeddings",
}


class HRMMegaConfig(PretrainedConfig):
    model_type = "hrm_mega"

    def __init__(self, hrm_model: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.hrm_model = dict(hrm_model or {})
        for ours, theirs in MIRRORED.items():
            if ours in self.hrm_model:
                kwargs.setdefault(theirs, self.hrm_model[ours])
        # HRMGemma applies its tied head itself (there is no lm_head module), so transformers must not tie.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
