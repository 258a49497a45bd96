"""Sparse sign-SGD for the puzzle-embedding table (as in the HRM paper).

The table is a plain tensor (a buffer of the model), not a parameter, so neither DeepSpeed nor ZeRO ever
sees it. Each step receives the ids used in this rank's batch and the gradients of their embedding rows.
Under data parallelism every rank all-gathers (ids, grads) so that all ranks apply the same update and the
replicas of the table stay identical. Gradients of duplicate ids are summed, then every touched row gets

    row *= 1 - lr*wd
    row -= lr * sign(grad_sum)

Rows that are not in the (global) batch are left untouched, not even decayed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class SparseSignSGD:
    """Sign-SGD on the rows of `table` named by the ids of each batch.

    Args:
        table: the [num_ids, dim] embedding table, updated in place.
        lr: learning rate; set `opt.lr` (or pass `lr=` to `step`) to follow a schedule.
        weight_decay: decoupled weight decay applied to touched rows only.
        group: the data-parallel process group. None means the default group when torch.distributed is
            initialised. Note: pass the DP group when tensor/pipeline parallelism is on; the default group
            would also gather the (identical) ids of TP peers, which doubles the sums but not their signs.
    """

    def __init__(
        self,
        table: torch.Tensor,
        lr: float,
        weight_decay: float = 0.0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if table.dim() != 2 or not table.is_floating_point():
            raise ValueError(
                f"SparseSignSGD: table must be a 2-D floating tensor, got {table.dtype} {tuple(table.shape)}"
            )
        _check_lr(lr)
        if not weight_decay >= 0.0:
            raise ValueError(f"SparseSignSGD: weight_decay must be >= 0, got {weight_decay}")
        self.table = table
        self.lr = lr
        self.weight_decay = weight_decay
        self.group = group

    def _world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, grads: torch.Tensor, lr: float | None = None) -> None:
        """Applies one update. `lr` overrides `self.lr` for this call only."""
        lr = self.lr if lr is None else lr
        _check_lr(lr)
        num_ids, dim = self.table.shape
        where = "SparseSignSGD.step"
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{where}: ids must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
        if grads.shape != (ids.numel(), dim):
            raise ValueError(
                f"{where}: grads must have shape ({ids.numel()}, {dim}), got {tuple(grads.shape)}"
            )
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())  # one host sync; worth it to fail with a clear message
            if lo < 0 or hi >= num_ids:
                raise ValueError(f"{where}: ids must lie in [0, {num_ids}), got range [{lo}, {hi}]")

        ids = ids.to(device=self.table.device, dtype=torch.long)
        grads = grads.to(device=self.table.device, dtype=torch.float32)
        if self._world_size() > 1:
            ids, grads = _all_gather_rows(ids, grads, self.group)
        if ids.numel() == 0:
            return

        # Sum duplicate ids first: the sign of the summed gradient, not a sum of signs.
        unique, inverse = torch.unique(ids, return_inverse=True)
        grad_sum = torch.zeros(unique.numel(), dim, dtype=torch.float32, device=grads.device)
        grad_sum.index_add_(0, inverse, grads)

        rows = self.table.index_select(0, unique).float()
        rows.mul_(1 - lr * self.weight_decay).sub_(grad_sum.sign_(), alpha=lr)
        self.table.index_copy_(0, unique, rows.to(self.table.dtype))

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters only: the table itself is saved with the model that owns it."""
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"lr", "weight_decay"} - set(state_dict)
        if missing:
            raise ValueError(f"SparseSignSGD.load_state_dict: missing keys {sorted(missing)}")
        _check_lr(state_dict["lr"])
        self.lr = float(state_dict["lr"])
        self.weight_decay = float(state_dict["weight_decay"])


def _check_lr(lr: float) -> None:
    if not float(lr) >= 0.0:
        raise ValueError(f"SparseSignSGD: lr must be >= 0, got {lr}")


def _all_gather_rows(
    ids: torch.Tensor, grads: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenates (ids, grads) of all ranks in rank order.

    Ranks normally pass the same n; counts are exchanged first so that a rank with a different n (e.g. a
    short last batch) gets a correct result instead of a size mismatch or a hang inside the collective.
    """
    world = dist.get_world_size(group)
    count = torch.tensor([ids.numel()], dtype=torch.long, device=ids.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    n_max = max(counts)

    pad = n_max - ids.numel()
    ids_padded = torch.cat([ids, ids.new_zeros(pad)])
    grads_padded = torch.cat([grads, grads.new_zeros(pad, grads.shape[1])])
    all_ids = [torch.empty_like(ids_padded) for _ in range(world)]
    all_grads = [torch.empty_like(grads_padded) for _ in range(world)]
    dist.all_gather(all_ids, ids_padded, group=group)
    dist.all_gather(all_grads, grads_padded, group=group)
    ids = torch.cat([x[:n] for x, n in zip(all_ids, counts)])
    grads = torch.cat([x[:n] for x, n in zip(all_grads, counts)])
    return ids, grads
