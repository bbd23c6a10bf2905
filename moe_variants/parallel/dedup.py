"""Expert-parallel dispatch with one copy of a token per destination rank.

:class:`~moe_variants.parallel.expert_parallel.AllToAllDispatcher` sends one row per routed copy: a token whose K
experts include two on the same rank travels there twice. :class:`OneCopyPerRankDispatcher` sends the token's
hidden state once per destination rank, with the local expert ids of its copies there (K ints), and the
destination expands the row into one copy per local expert. The rows sent in the forward dispatch (and their
gradients in backward) drop from the number of copies to the number of (token, rank) pairs, at the cost of a
second, small all-to-all (the K ints per row). The return trip still carries one row per copy: summing a token's
copies on the destination would need the router weights there.

The experts see exactly the rows, in exactly the order, of ``AllToAllDispatcher`` (inside a local expert: by
source rank, then token), so the outputs are the same; a token's input gradient is summed over its copies on the
destination first, so gradients agree up to float rounding.

Shape legend (as in ``expert_parallel``): T tokens on this rank, K experts per token, D model dim, W EP group size,
L local experts, P (token, rank) rows this rank sends, R rows it receives, C copies it computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_variants.model.experts import Dispatched, expert_counts, inverse_permutation, permute_rows
from moe_variants.parallel.expert_parallel import AllToAllDispatcher, SplitPlan, _all_to_all, _check_plan


class _ExpandRows(torch.autograd.Function):
    """``x[rows]`` where row r of x has M slots (slot ``r*M + m``) and ``inverse`` maps each of the R*M slots to the
    output row that copies it (or to C: none). The backward is a gather by ``inverse`` (from the output gradient with
    a zero row appended) and a sum over the M slots: deterministic, no accumulating scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor, slots: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.slots = slots
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        g = padded.index_select(0, inverse).view(-1, ctx.slots, *grad.shape[1:]).sum(1)
        return g, None, None, None


def expand_slots(x: torch.Tensor, valid_RM: torch.Tensor, key_RM: torch.Tensor, copies: int) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``copies`` valid slots of ``valid_RM`` (R rows x M slots), sorted by ``key_RM`` (stable: by row, then
    slot, inside a key), as rows of x: returns (x copies (C, ...), slot of each copy (C,), copy of each slot (R*M,),
    C for an invalid slot). ``copies`` must be ``valid_RM.sum()`` (a host int, known from the split exchange)."""
    R, M = valid_RM.shape
    key = torch.where(valid_RM, key_RM, torch.iinfo(key_RM.dtype).max).flatten()
    slot_C = key.argsort(stable=True)[:copies]
    inverse = torch.full((R * M,), copies, dtype=torch.long, device=x.device)
    inverse.scatter_(0, slot_C, torch.arange(copies, device=x.device))
    return _ExpandRows.apply(x, slot_C // M, inverse, M), slot_C, inverse


@dataclass
class OneCopyDispatched(Dispatched):
    """``Dispatched`` plus the return trip. ``order``/``inverse`` (as in ``LocalDispatcher``) sort this rank's T*K
    copies by destination rank, then token: the order in which the destinations send the copies' outputs back."""

    back: torch.Tensor  # (C,) expert-grouped copy of each copy in (source rank, row, slot) order
    back_inverse: torch.Tensor  # (C,) its inverse
    send_splits: list[int]  # hidden-state rows sent to each rank: one per (token, rank) pair
    recv_splits: list[int]  # rows received from each rank
    copy_splits: list[int]  # copies this rank's tokens have on each rank (rows it receives back)
    recv_copy_splits: list[int]  # copies it computes for each source rank (rows it sends back)


class OneCopyPerRankDispatcher(AllToAllDispatcher):
    """``AllToAllDispatcher`` sending each token once per destination rank (see the module docstring). Same
    interface; one host sync per dispatch, for the split sizes (none given a ``SplitPlan``)."""

    def _destinations(self, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(T, K) destination rank of each copy (W: skipped), (T, W) whether a token has copies on each rank."""
        W, L = self.ep_size, self.num_local_experts
        dest_TK = expert_ids_TK // L
        if keep_TK is not None:  # skipped copies go to rank "W": nowhere
            dest_TK = dest_TK.masked_fill(~keep_TK, W)
        has_TW = torch.zeros(dest_TK.shape[0], W + 1, dtype=torch.bool, device=dest_TK.device)
        return dest_TK, has_TW.scatter_(1, dest_TK, True)[:, :W]

    def _counts(self, dest_TK: torch.Tensor, has_TW: torch.Tensor) -> torch.Tensor:
        return torch.stack([has_TW.sum(0), expert_counts(dest_TK, self.ep_size + 1)[: self.ep_size]], 1)

    def send_counts(self, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        """(W, 2): (token, rank) rows and copies this rank sends to each rank."""
        return self._counts(*self._destinations(expert_ids_TK, keep_TK))

    @staticmethod
    def split_sizes(sent: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """(4, W): rows sent, copies sent, rows received, copies received, per rank."""
        return torch.cat([sent, received], 1).T

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None = None,
                 plan: SplitPlan | None = None) -> OneCopyDispatched:
        W, L = self.ep_size, self.num_local_experts
        T, K = expert_ids_TK.shape
        dest_TK, has_TW = self._destinations(expert_ids_TK, keep_TK)
        if plan is None:
            send = self._counts(dest_TK, has_TW)  # (W, 2)
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=self.group)
        else:
            _check_plan(plan, keep_TK)
        order = dest_TK.flatten().argsort(stable=True)  # copies by destination, then token (the return order)
        rank_TW = torch.arange(W, device=x_TD.device).expand(T, W)
        splits = self.split_sizes(send, recv).tolist() if plan is None else plan.sizes  # the one host sync
        send_splits, copy_splits, recv_splits, recv_copy_splits = splits

        # rows to send: the (token, rank) pairs, by rank then token; x_send[p] = x_TD[token of p]
        x_send, slot_P, _ = expand_slots(x_TD, has_TW, rank_TW, sum(send_splits))
        t_P, s_P = slot_P // W, slot_P % W
        # the local ids of the token's copies on that rank, -1 for its copies elsewhere (or skipped)
        on_rank_PK = dest_TK.index_select(0, t_P) == s_P.unsqueeze(1)
        meta_PK = torch.where(on_rank_PK, expert_ids_TK.index_select(0, t_P) - s_P.unsqueeze(1) * L, -1)
        x_recv = _all_to_all(x_send, recv_splits, send_splits, self.group)  # (R, D) by source rank, then token
        meta_RK = meta_PK.new_empty((x_recv.shape[0], K))
        dist.all_to_all_single(meta_RK, meta_PK, recv_splits, send_splits, group=self.group)

        # expand: one row per (received row, local expert), grouped by local expert (stable: by source, token)
        C = sum(recv_copy_splits)
        valid_RK = meta_RK >= 0
        x_C, slot_C, copy_of_slot = expand_slots(x_recv, valid_RK, meta_RK, C)
        valid_slots = (~valid_RK).flatten().to(torch.uint8).argsort(stable=True)[:C]  # by source rank, row, slot
        back = copy_of_slot.index_select(0, valid_slots)
        tokens_per_expert = expert_counts(meta_RK.masked_fill(~valid_RK, L), L + 1)[:L]
        return OneCopyDispatched(
            x=x_C, tokens_per_expert=tokens_per_expert, order=order, inverse=inverse_permutation(order),
            keep=keep_TK, back=back, back_inverse=inverse_permutation(back), send_splits=send_splits,
            recv_splits=recv_splits, copy_splits=copy_splits, recv_copy_splits=recv_copy_splits,
        )

    def combine(self, y_CD: torch.Tensor, weights_TK: torch.Tensor, d: OneCopyDispatched) -> torch.Tensor:
        y_back = permute_rows(y_CD, d.back, d.back_inverse)  # by source rank, row, slot
        y_sorted = _all_to_all(y_back, d.copy_splits, d.recv_copy_splits, self.group)  # by destination, token
        if d.keep is not None:  # rows for the skipped copies (sorted last), masked in combine
            y_sorted = torch.cat([y_sorted, y_sorted.new_zeros(d.order.numel() - y_sorted.shape[0], y_sorted.shape[1])])
        return self._local.combine(y_sorted, weights_TK, d)

