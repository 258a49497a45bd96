"""HRMGemma at N = T = 1 against transformers' Gemma3ForCausalLM: training tokens/s, same weights, one process.

Both models are the same Gemma 3 (hidden 256, 6 layers = 5 local + 1 global, 4 query heads sharing one
kv head of 64, GeGLU width 1024, window 128, vocabulary 8192), built from one LMModelConfig; the
transformers model gets HRMGemma's weights through `to_hf_state_dict`, and the script first checks that
the two give the same logits (within 1e-4), so both sides compute one function. A training step is
forward, next-token cross entropy, backward and an AdamW step (lr 1e-4) on --batch rows of --seq
random tokens, each row one document. Each side runs in its default mode: eager PyTorch, transformers'
default attention (sdpa), HRMGemma's loss as `hrm-mega train` computes it (lm_loss: CE + the halting
head's terms, which N = 1 makes constant) with the labels passed to the forward as the trainer passes
them, so the CE runs through the head in chunks without building the logits. The two alternate for --rounds rounds of --steps timed
steps after one untimed step each (the order flips every round); tokens/s are means over rounds and the ratio is HRMGemma /
transformers.

    python bench/hf_gemma_speed.py [--batch 8] [--seq 512] [--rounds 4] [--steps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from transformers import Gemma3ForCausalLM

from hrm_mega.config import LMModelConfig
from hrm_mega.convert.hf_gemma import hf_config_from, to_hf_state_dict
from hrm_mega.models.lm import HRMGemma, lm_loss

CONFIG = LMModelConfig(
    vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=6, num_heads=4, num_kv_heads=1,
    head_dim=64, query_pre_attn_scalar=64, sliding_window=128, local_per_global=5, max_position=2048,
    h_cycles=1, l_cycles=1,
)  # fmt: skip


def models() -> tuple[HRMGemma, Gemma3ForCausalLM]:
    ours = HRMGemma(CONFIG).init_weights(0)
    hf_config = hf_config_from(CONFIG)
    hf_config._attn_implementation = "sdpa"
    theirs = Gemma3ForCausalLM(hf_config)
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), CONFIG), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise SystemExit(f"weights do not map: missing {missing}, unexpected {unexpected}")
    return ours.train(), theirs.train()


def training_steps(
    ours: HRMGemma, theirs: Gemma3ForCausalLM, ids: torch.Tensor
) -> dict[str, Callable[[], float]]:
    optimizers = {
        name: torch.optim.AdamW(m.parameters(), lr=1e-4)
        for name, m in (("hrm-mega", ours), ("transformers", theirs))
    }

    def ours_step() -> float:
        logits, aux = ours(ids, labels=ids)  # as the trainer calls it: the CE through the head in chunks
        loss = lm_loss(logits, ids, aux, CONFIG)["loss"]
        loss.backward()
        optimizers["hrm-mega"].step()
        optimizers["hrm-mega"].zero_grad(set_to_none=True)
        return loss.item()

    def theirs_step() -> float:
        loss = theirs(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizers["transformers"].step()
        optimizers["transformers"].zero_grad(set_to_none=True)
        return loss.item()

    return {"hrm-mega": ours_step, "transformers": theirs_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side and round")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ours, theirs = models()
    ids = torch.randint(
        0, CONFIG.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        diff = (ours(ids)[0] - theirs(input_ids=ids).logits).abs().max().item()
    print(f"same weights: max |logits difference| {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the two models do not compute the same function; no comparison")
    steps = training_steps(ours, theirs, ids)
    for step in steps.values():
        step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds):
        order = list(steps.items())
        for name, step in order if round_ % 2 == 0 else order[::-1]:  # neither side always goes first
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch * args.seq / (time.perf_counter() - start))
    means = {name: sum(r) / len(r) for name, r in rates.items()}
    print(
        f"training tokens/s, batch {args.batch} x seq {args.seq}, fp32, {args.threads} threads, {args.rounds} rounds:"
    )
    for name in steps:
        rounds = " ".join(f"{r:.0f}" for r in rates[name])
        print(f"  {name:<13} {means[name]:>8.0f}  (rounds: {rounds})")
    print(f"  hrm-mega / transformers: {means['hrm-mega'] / means['transformers']:.2f}x")


if __name__ == "__main__":
    main()
