"""Expert-parallel token exchange overlapped with the expert compute (opt-in: ``parallel.overlap=true``).

:class:`OverlappedDispatcher` moves the same rows as ``AllToAllDispatcher``, but as W - 1 point-to-point rounds
instead of one all-to-all: in round j rank r sends the rows for rank r + j and receives those from rank r - j (mod
W). The rows from one source arrive sorted by its global expert order, i.e. already grouped by local expert, so the
experts can run on one source's rows while the other sources' rows are still in flight:

    post every dispatch round                       (rows travel in the background)
    experts(own rows)                               (round 0: no transfer at all)
    for j = 1 .. W-1: wait for round j, experts(its rows), post its return trip
    wait for the return trips, unsort, weighted sum (``LocalDispatcher.combine``)

Each transfer is two autograd nodes: :class:`_Post` starts it and :class:`_Wait` waits for it. In backward the
order flips: ``_Wait``'s backward starts the reverse transfer of the gradient and ``_Post``'s backward waits for
it, so the gradients also travel while autograd runs the nodes in between (other rounds' expert backward).

The experts run once per source rank instead of once on all rows: outputs equal the plain path's row by row, and
expert weight gradients are sums over the sources (equal up to float rounding). Whether this is faster than one
all-to-all depends on the interconnect and the expert GEMM sizes: measure it on GPUs (``experiments/bench/
expert_parallel.py --overlap``). Under ``torch.compile`` the plain path runs.

Shape legend (as in ``expert_parallel``): T tokens on this rank, K experts per token, D model dim, W EP group size,
L local experts, N routed copies this rank sends, R_s rows it receives from rank s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from moe_variants.model.experts import Experts
from moe_variants.parallel.expert_parallel import AllToAllDispatcher, SplitPlan


class _Transfer:
    """One point-to-point round: send rows to group rank ``to``, receive rows from group rank ``frm``. Both ends
    know every size (from the split exchange), so a zero-row side posts nothing on either end."""

    def __init__(self, group: Any, to: int, frm: int, tag: int) -> None:
        self.group, self.to, self.frm, self.tag = group, to, frm, tag
        self.works: list[Any] = []
        self.buffers: tuple[torch.Tensor, ...] = ()  # what must live until the transfer is done
        self.back: _Transfer | None = None  # the gradient's reverse transfer (set in backward)

    def start(self, send_ND: torch.Tensor, recv_rows: int) -> torch.Tensor:
        """Post the transfer; returns the receive buffer (valid after :meth:`wait`)."""
        send_ND = send_ND.contiguous()
        recv_RD = send_ND.new_empty((recv_rows, *send_ND.shape[1:]))
        ops = []
        if send_ND.shape[0]:
            ops.append(dist.P2POp(dist.isend, send_ND, dist.get_global_rank(self.group, self.to), self.group,
                                  self.tag))
        if recv_rows:
            ops.append(dist.P2POp(dist.irecv, recv_RD, dist.get_global_rank(self.group, self.frm), self.group,
                                  self.tag))
        # one batch: NCCL groups the send and the receive, so that two ranks exchanging with each other never wait
        # on each other's send
        self.works = dist.batch_isend_irecv(ops) if ops else []
        self.buffers = (send_ND, recv_RD)
        return recv_RD

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()  # on a GPU: the compute stream waits, the host does not
        recv_RD = self.buffers[1]
        self.works, self.buffers = [], ()
        return recv_RD

    def reversed(self, tag: int) -> _Transfer:
        return _Transfer(self.group, self.frm, self.to, tag)


class _Post(torch.autograd.Function):
    """Start ``transfer`` of ``x_send`` (and a receive of ``recv_rows`` rows); the output is valid after
    :class:`_Wait`. Backward: wait for the gradient of ``x_send``, sent back by the receiver."""

    @staticmethod
    def forward(ctx, x_send: torch.Tensor, transfer: _Transfer, recv_rows: int) -> torch.Tensor:
        ctx.transfer = transfer
        return transfer.start(x_send, recv_rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # ``grad`` (of the receive buffer) already went back to its sender in _Wait.backward
        return ctx.transfer.back.wait(), None, None


class _Wait(torch.autograd.Function):
    """Wait for ``transfer``; returns its received rows. Backward: start sending the gradient of the received rows
    back to their sender (and receiving that of the sent rows), which :class:`_Post`'s backward waits for."""

    @staticmethod
    def forward(ctx, recv: torch.Tensor, transfer: _Transfer, reverse_tag: int, send_rows: int) -> torch.Tensor:
        ctx.transfer, ctx.reverse_tag, ctx.send_rows = transfer, reverse_tag, send_rows
        transfer.wait()
        return recv

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        t = ctx.transfer
        t.back = t.reversed(ctx.reverse_tag)
        t.back.start(grad, ctx.send_rows)
        return grad, None, None, None


class OverlappedDispatcher(AllToAllDispatcher):
    """``AllToAllDispatcher`` whose :meth:`run` overlaps the token exchanges with the expert compute (see the
    module docstring). ``dispatch`` / ``combine`` are the parent's (one all-to-all each), for callers that run the
    experts themselves; the results are the same."""

    def run(self, experts: Experts, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
            keep_TK: torch.Tensor | None = None, plan: SplitPlan | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # dynamo does not trace the c10d point-to-point work handles
            return super().run(experts, x_TD, expert_ids_TK, weights_TK, keep_TK, plan)
        W, r = self.ep_size, self.ep_rank
        d, received_WL, send_splits, recv_splits = self._sort_and_split(x_TD, expert_ids_TK, keep_TK, plan)
        # (N, D) by global expert = by destination rank; skipped copies (keep_TK False) sit after every group
        x_send = d.x[: sum(send_splits)].split(send_splits)

        # tags keep the rounds of one layer apart on a pair of ranks (gloo matches by tag; NCCL runs in post order)
        dispatch = {j: _Transfer(self.group, (r + j) % W, (r - j) % W, tag=4 * j) for j in range(1, W)}
        pending = {j: _Post.apply(x_send[(r + j) % W], t, recv_splits[(r - j) % W]) for j, t in dispatch.items()}

        y_from: dict[int, torch.Tensor] = {}  # by destination rank: the outputs of the rows this rank sent there
        back = {}
        for j in range(W):  # round j: the rows from source s = r - j, grouped by local expert
            s = (r - j) % W
            x_RD = x_send[r] if j == 0 else _Wait.apply(pending[j], dispatch[j], 4 * j + 1, send_splits[(r + j) % W])
            # an empty round still goes through the return trip, so that its gradient exchange runs in backward
            y_RD = experts(x_RD, received_WL[s]) if recv_splits[s] else x_RD
            if j == 0:
                y_from[r] = y_RD
                continue
            back[j] = _Transfer(self.group, s, (r + j) % W, tag=4 * j + 2)
            y_from[(r + j) % W] = _Post.apply(y_RD, back[j], send_splits[(r + j) % W])
        for j, t in back.items():
            dst = (r + j) % W
            y_from[dst] = _Wait.apply(y_from[dst], t, 4 * j + 3, recv_splits[(r - j) % W])

        y_sorted = torch.cat([y_from[dst] for dst in range(W)])  # (N, D) by global expert
        if d.keep is not None:  # rows for the skipped copies, masked in combine
            y_sorted = torch.cat([y_sorted, y_sorted.new_zeros(d.order.numel() - y_sorted.shape[0], y_sorted.shape[1])])
        return self._local.combine(y_sorted, weights_TK, d)
