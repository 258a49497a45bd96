"""RL post-training building blocks (GRPO, Dr. GRPO, PPO) for both model families.

    rollout.py      sample rollouts (puzzles: ACT loop + per-cell sampling; LM: KV-cached generation with
                    per-token halting) and recompute their log-probs with the training forward
    rewards.py      named reward functions (register_reward / get_reward) and halting-aware shaping
    advantages.py   group-relative advantages (group | batch | none std scaling) and GAE
    losses.py       clipped policy loss with asymmetric clipping and k3 KL, value loss, step-global
                    aggregation (token_mean | seq_mean_token_mean | dr_grpo)

A GRPO step, in outline:

    ro = rollout.puzzle_rollout(model, batch, group_size=8, seed=step_seed)
    reward = rewards.get_reward("sudoku_valid")(tokens=ro.tokens, inputs=ro.batch["inputs"])
    reward = rewards.shape_for_compute(reward, rewards.compute_fraction(ro.segments, max_steps), lam)
    adv = advantages.group_advantages(reward, ro.group_size, "group")
    norm = all_reduce(losses.loss_normalizer("token_mean", ro.mask))     # over micro-batches and ranks
    new = rollout.recompute_policy(engine, ro)
    loss, metrics = losses.policy_loss(new.logprobs, ro.logprobs, adv, ro.mask, normalizer=norm)
"""
