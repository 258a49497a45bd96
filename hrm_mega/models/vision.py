"""HRMGemma's image encoder: a SigLIP vision tower and Gemma 3's multimodal projector.

    pixels [n, 3, S, S]                                         # S = image_size, one image (or crop) each
    x = conv_p(pixels) -> [n, P*P, d] + position_embedding      # P = S / patch_size patches per side, row-major
    for each encoder layer:                                     # pre-LayerNorm ViT, bidirectional
        x = x + attn(layer_norm1(x))                            # multi-head, scale head_dim**-0.5, biases
        x = x + fc2(gelu_tanh(fc1(layer_norm2(x))))
    x = post_layernorm(x)                                       # [n, P*P, d]
    t = avg_pool(x as [n, d, P, P], P / T) -> [n, T*T, d]       # T = sqrt(mm_tokens_per_image) per side
    features = rms_norm_(1+w)(t) @ W                            # [n, mm_tokens_per_image, text hidden]

Tensor parallelism enters as in the text layers: q/k/v and fc1 are column-parallel, out_proj and fc2
row-parallel (so every rank ends a layer with the whole activation), heads split across ranks. The patch
embedding, position table, norms and the projector are replicated: their inputs and output gradients are
the same on every rank, so their gradients are too. The projector's output is added into the text
residual stream, which is replicated, so it is a plain (unsplit) linear.

Only the image encoder is here; HRMGemma (models/lm.py) puts the features into the token sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hrm_mega import distributed
from hrm_mega.config.model import VisionConfig
from hrm_mega.models.layers import RMSNorm, column_linear, lecun_init, row_linear, set_init


def layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim, eps=eps)
    set_init(norm.weight, "constant", 1.0)
    set_init(norm.bias, "constant", 0.0)
    return norm


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases (SigLIP): every patch sees every patch."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        tp = distributed.tp_size()
        if num_heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide model.vision.num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads // tp, hidden_size // num_heads  # this rank's heads
        self.q_proj = column_linear(hidden_size, hidden_size, bias=True)
        self.k_proj = column_linear(hidden_size, hidden_size, bias=True)
        self.v_proj = column_linear(hidden_size, hidden_size, bias=True)
        self.out_proj = row_linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, patches, hidden] -> [n, patches, hidden]."""
        n, s, _ = x.shape
        q, k, v = (
            proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [n, heads, s, d]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(n, s, self.num_heads * self.head_dim))


class VisionMLP(nn.Module):
    """fc2(gelu_tanh(fc1(x))), with biases."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        tp = distributed.tp_size()
        if intermediate_size % tp:
            raise ValueError(
                f"parallel.tp={tp} must divide model.vision.intermediate_size={intermediate_size}"
            )
        self.fc1 = column_linear(hidden_size, intermediate_size, bias=True)
        self.fc2 = row_linear(intermediate_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c = config
        self.layer_norm1 = layer_norm(c.hidden_size, c.layer_norm_eps)
        self.self_attn = VisionAttention(c.hidden_size, c.num_heads)
        self.layer_norm2 = layer_norm(c.hidden_size, c.layer_norm_eps)
        self.mlp = VisionMLP(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipVisionTower(nn.Module):
    """SigLIP's ViT without its pooling head: pixels [n, 3, S, S] -> patch features [n, P*P, d]."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c = self.config = config
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        lecun_init(self.patch_embedding.weight, 3 * c.patch_size**2)
        set_init(self.patch_embedding.bias, "constant", 0.0)
        # one learned vector per patch position, row-major over the P x P grid (no interpolation: the
        # input size is fixed, as in Gemma 3)
        self.position_embedding = nn.Parameter(torch.empty(c.patches_per_side**2, c.hidden_size))
        set_init(self.position_embedding, "trunc_normal", 1.0 / math.sqrt(c.hidden_size))
        self.layers = nn.ModuleList(VisionEncoderLayer(c) for _ in range(c.num_layers))
        self.post_layernorm = layer_norm(c.hidden_size, c.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected [n_images, 3, {size}, {size}]"
            )
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(weight.dtype))  # [n, d, P, P]
        x = x.flatten(2).transpose(1, 2) + self.position_embedding  # [n, P*P, d]
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


class MultimodalProjector(nn.Module):
    """Gemma 3's projector: patch features [n, P*P, d] -> [n, mm_tokens_per_image, text_hidden].

    The P x P grid is average-pooled in (P/T) x (P/T) squares to T x T tokens (row-major), normalised
    by RMSNorm with Gemma's (1 + w), and projected into the text width without a bias."""

    def __init__(self, config: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_eps, weight="gemma")
        self.proj = nn.Linear(config.hidden_size, text_hidden_size, bias=False)
        lecun_init(self.proj.weight, config.hidden_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        c = self.config
        n, _, d = patches.shape
        grid = patches.transpose(1, 2).reshape(n, d, c.patches_per_side, c.patches_per_side)
        kernel = c.patches_per_side // c.tokens_per_side
        pooled = F.avg_pool2d(grid, kernel).flatten(2).transpose(1, 2)  # [n, T*T, d]
        return self.proj(self.norm(pooled))


class ImageEncoder(nn.Module):
    """Tower + projector: pixel_values [n, 3, S, S] -> image features [n, mm_tokens_per_image, text_hidden].

    With `trainable` false the tower is frozen (requires_grad off) and run without autograd, so it keeps
    no activations for backward; the projector always trains."""

    def __init__(self, config: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.tower = SiglipVisionTower(config)
        self.projector = MultimodalProjector(config, text_hidden_size)
        self.tower.requires_grad_(config.trainable)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.trainable):
            patches = self.tower(pixel_values)
        return self.projector(patches)


def image_token_ids(config: VisionConfig) -> list[int]:
    """The ids that stand for one image in a row: <start_of_image>, mm_tokens_per_image placeholders,
    <end_of_image>. (Gemma 3's processor also puts "\\n\\n" before and after, which is tokenizer text.)"""
    return [config.boi_token_id, *[config.image_token_id] * config.mm_tokens_per_image, config.eoi_token_id]
