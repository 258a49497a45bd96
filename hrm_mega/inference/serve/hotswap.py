"""Hot swap: load a candidate model directory, run the canary on it, and only then hot-swap.

    candidate = load_candidate(path, device="cpu", dtype=torch.float32)   # model directories only
    result = run_canary(candidate, canary)                                # CanaryResult
    if result.passed:
        old = engine.swap(candidate)                                      # between batches

A candidate must be an hrm-mega model directory (model.safetensors + config.yaml; also a quantized one)
or a consolidated .safetensors file: never a training checkpoint, whose engine files are pickles. Its format version is
checked (a newer one is refused with one line).

The canary is a fixed prompt set run greedily on the candidate before it serves. It passes when every
logit is finite, no output is one token repeated (a collapsed model), and, for prompts that carry an
expected output, the share of expected tokens the candidate reproduces (position by position) is at
least `min_agreement`. A canary file is JSON Lines, one `{"prompt": TEXT, "expected": TEXT}` per line
("expected" optional).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hrm_mega.checkpoint.model_dir import CONFIG, WEIGHTS, CheckpointError, load_state_dict_strict
from hrm_mega.inference.generate import stream_generate
from hrm_mega.inference.serve.engine import Busy, Engine
from hrm_mega.models.lm import HRMGemma

DEFAULT_PROMPTS = ("12 plus 7 is", "The quick brown fox", "sort 3 1 2:", "Once upon a time")


class SwapError(ValueError):
    """A candidate that cannot be loaded or did not pass the canary; the message is one line."""


@dataclass(frozen=True)
class Canary:
    prompts: tuple[tuple[int, ...], ...]
    expected: tuple[tuple[int, ...] | None, ...]
    max_tokens: int = 16
    min_agreement: float = 0.9


@dataclass
class CanaryResult:
    passed: bool
    reason: str  # why it failed, or "ok"
    agreement: float | None  # share of expected tokens reproduced (None without expectations)

    def as_json(self) -> dict[str, object]:
        return {"passed": self.passed, "reason": self.reason, "agreement": self.agreement}


def load_canary(
    path: str | None,
    encode: Callable[[str], list[int]],
    bos_id: int | None,
    *,
    max_tokens: int = 16,
    min_agreement: float = 0.9,
) -> Canary:
    """The canary of a JSON Lines file, or DEFAULT_PROMPTS (no expected outputs) when path is None."""
    if not 0 <= min_agreement <= 1:
        raise ValueError(f"--canary-min-agreement {min_agreement} must be in [0, 1]")
    if max_tokens < 1:
        raise ValueError(f"--canary-max-tokens {max_tokens} must be >= 1")
    rows: list[tuple[str, str | None]] = [(p, None) for p in DEFAULT_PROMPTS]
    if path is not None:
        rows = []
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"--canary {path}: cannot read it ({e.strerror or e})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(
                    (str(row["prompt"]), None if row.get("expected") is None else str(row["expected"]))
                )
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f'--canary {path}:{n}: expected {{"prompt": TEXT, "expected": TEXT}} (expected optional)'
                ) from None
        if not rows:
            raise ValueError(f"--canary {path} holds no prompts")
    bos = [] if bos_id is None else [bos_id]
    return Canary(
        prompts=tuple(tuple(bos + encode(p)) for p, _ in rows),
        expected=tuple(None if e is None else tuple(encode(e))[:max_tokens] for _, e in rows),
        max_tokens=max_tokens,
        min_agreement=min_agreement,
    )


def run_canary(model: HRMGemma, canary: Canary, vocab_limit: int | None = None) -> CanaryResult:
    """Greedy outputs of every canary prompt on `model`, checked (module docstring)."""
    matched = total = 0
    for i, (prompt, expected) in enumerate(zip(canary.prompts, canary.expected, strict=True)):
        device = model.embed_tokens.weight.device
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        with torch.inference_mode():
            steps = list(_greedy_steps(model, ids, canary.max_tokens, vocab_limit))
        if not all(bool(torch.isfinite(s).all()) for s in steps):
            return CanaryResult(False, f"prompt {i}: non-finite logits", None)
        tokens = [int(s.argmax(dim=-1)[0]) for s in steps]
        if len(tokens) >= 4 and len(set(tokens)) == 1:
            return CanaryResult(False, f"prompt {i}: the output is one token repeated ({tokens[0]})", None)
        if expected is not None:
            total += len(expected)
            matched += sum(a == b for a, b in zip(tokens, expected, strict=False))
    agreement = None if total == 0 else matched / total
    if agreement is not None and agreement < canary.min_agreement:
        return CanaryResult(
            False,
            f"it reproduces {agreement:.1%} of the expected tokens, below {canary.min_agreement:.1%}",
            agreement,
        )
    return CanaryResult(True, "ok", agreement)


def _greedy_steps(model: HRMGemma, ids: torch.Tensor, max_tokens: int, vocab_limit: int | None):
    for step in stream_generate(model, ids, max_new_tokens=max_tokens, greedy=True, vocab_limit=vocab_limit):
        logits = step.logits
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        yield logits


def load_candidate(path: str | Path, *, device: torch.device | str, dtype: torch.dtype) -> HRMGemma:
    """An HRMGemma from an hrm-mega model directory or consolidated .safetensors file (nothing else), on
    `device` in `dtype`, in eval mode."""
    from hrm_mega.checkpoint.consolidate import load_state
    from hrm_mega.checkpoint.quantized import is_quantized_dir, load_quantized
    from hrm_mega.models import build_model

    p = Path(path)
    is_dir = p.is_dir() and (p / WEIGHTS).is_file() and (p / CONFIG).is_file()
    if not is_dir and not (p.is_file() and p.suffix == ".safetensors"):
        raise SwapError(
            f"{path}: not an hrm-mega model directory ({WEIGHTS} + {CONFIG}) or consolidated .safetensors "
            "file; a swap takes only those, never a training checkpoint (hrm-mega consolidate makes one)"
        )
    try:
        if is_dir and is_quantized_dir(p):
            model, config = load_quantized(p)
        else:
            state, config = load_state(p)
            model = build_model(config.model)
            load_state_dict_strict(model, state, source=str(p))
    except (CheckpointError, ValueError) as e:
        raise SwapError(str(e).splitlines()[0]) from None
    if not isinstance(model, HRMGemma):
        raise SwapError(f"{path}: a model.family={config.model.family} model; serving needs hrm_gemma")
    return model.to(device=device, dtype=dtype).eval()


class HotSwap:
    """Swaps and rollbacks of one engine's model, one at a time (the admin endpoints call these on a
    worker thread). `current` names what serves now; `previous` is kept for a rollback."""

    def __init__(
        self,
        engine: Engine,
        canary: Canary,
        *,
        current: str,
        dtype: torch.dtype = torch.float32,
        swap_timeout: float = 600.0,
    ) -> None:
        self.engine, self.canary, self.dtype, self.swap_timeout = engine, canary, dtype, swap_timeout
        self.current = current
        self.previous: tuple[HRMGemma, str] | None = None
        self._lock = threading.Lock()

    def swap_to(self, path: str) -> dict[str, object]:
        """Loads `path`, runs the canary, swaps (SwapError with one line when refused)."""
        if not self._lock.acquire(blocking=False):
            raise SwapError("another swap is under way; retry when it is done")
        try:
            candidate = load_candidate(path, device=self.engine.device, dtype=self.dtype)
            result = run_canary(candidate, self.canary, self.engine.vocab_limit)
            if not result.passed:
                raise SwapError(f"{path} failed the canary ({result.reason}); still serving {self.current}")
            return self._swap(candidate, str(path), result)
        finally:
            self._lock.release()

    def rollback(self) -> dict[str, object]:
        """Back to the model served before the last swap (it passed its canary then)."""
        if not self._lock.acquire(blocking=False):
            raise SwapError("another swap is under way; retry when it is done")
        try:
            if self.previous is None:
                raise SwapError(f"nothing to roll back to: {self.current} is the first model served")
            model, name = self.previous
            return self._swap(model, name, None)
        finally:
            self._lock.release()

    def _swap(self, model: HRMGemma, name: str, result: CanaryResult | None) -> dict[str, object]:
        try:
            old = self.engine.swap(model, timeout=self.swap_timeout)
        except (Busy, TimeoutError, ValueError) as e:
            raise SwapError(f"{e}; still serving {self.current}") from None
        self.previous, self.current = (old, self.current), name
        return {"status": "swapped", "model": name, "previous": self.previous[1], "swaps": self.engine.swaps,
                "canary": None if result is None else result.as_json()}  # fmt: skip
