"""A plain-torch stand-in for ``deep_ep``'s low-latency Buffer, over gloo, for CPU tests.

It follows the contract of DeepEP's ``Buffer.low_latency_dispatch`` / ``low_latency_combine``
(deep_ep/buffers/legacy.py in DeepEP 2.x, deep_ep/buffer.py in 1.x) as far as afd.deepep uses it:
the same arguments, return tuples, shapes and dtypes, the same input checks its C++ side makes,
receive slabs [local experts, ranks * M, H] whose first ``recv_count[e]`` rows are real, a
``return_recv_hook`` whose call completes the receive, and a combine that returns the top-k
weighted sum per token. The wire is one padded async ``all_to_all_single`` per call on the
Buffer's group, so every rank must issue the same call sequence per Buffer, as with DeepEP.
Not modelled: FP8/LogFMT, CUDA streams and events, NVSHMEM, timeouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

topk_idx_t = torch.int64


@dataclass
class FakeHandle:
    """What combine needs: this rank's sends (to reduce the answers) and its receipts."""

    sent: list  # [R][S] long tensors: token index of each row sent to (rank, local expert)
    received: list  # [S][R] (begin, count): rows from each source rank in each local slab
    recv_src: torch.Tensor  # [S, R*M] long: source token index of each received row


class FakeEvent:
    def current_stream_wait(self) -> None:
        pass


class Buffer:
    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None) -> None:
        assert low_latency_mode and num_rdma_bytes > 0
        self.group = group
        self.rank, self.group_size = dist.get_rank(group), dist.get_world_size(group)
        self.num_qps_per_rank = num_qps_per_rank
        self.calls = 0  # the real Buffer flips its double buffer on every call
        dist.barrier(group=group)  # construction is collective

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        return 2 * num_experts * num_max_dispatch_tokens_per_rank * hidden * 2

    def destroy(self) -> None:
        pass

    def _exchange(self, send: torch.Tensor) -> tuple[torch.Tensor, object]:
        recv = torch.empty_like(send)
        return recv, dist.all_to_all_single(recv, send, group=self.group, async_op=True)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None,
                             dispatch_wait_recv_cost_stats=None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        r, m = self.group_size, num_max_dispatch_tokens_per_rank
        assert x.dim() == 2 and x.is_contiguous() and x.dtype == torch.bfloat16
        assert x.shape[1] % 128 == 0 or x.shape[1] < 128  # small hidden allowed in the fake
        assert topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.dtype == topk_idx_t
        assert x.shape[0] == topk_idx.shape[0] and x.shape[0] <= m
        assert num_experts % r == 0 and (r * m) % 4 == 0
        assert not (async_finish and return_recv_hook)
        assert not use_fp8, "the fake moves bf16 only"
        s, hidden = num_experts // r, x.shape[1]
        self.calls += 1
        # send[dst, e, i]: i-th row for dst's local expert e; meta: count and source token
        send = torch.zeros(r, s, m, hidden + 2, dtype=torch.float32)
        sent = [[None] * s for _ in range(r)]
        for g in range(num_experts):
            tokens = (topk_idx == g).any(dim=1).nonzero().flatten()
            dst, e = divmod(g, s)
            sent[dst][e] = tokens
            send[dst, e, : len(tokens), :hidden] = x[tokens].float()
            send[dst, e, : len(tokens), hidden] = tokens.float()
            send[dst, e, 0, hidden + 1] = len(tokens)
        recv, work = self._exchange(send)
        packed_x = torch.empty(s, r * m, hidden, dtype=torch.bfloat16)
        count = torch.zeros(s, dtype=torch.int32)
        recv_src = torch.full((s, r * m), -1, dtype=torch.long)
        received = [[None] * r for _ in range(s)]

        def receive() -> None:
            work.wait()
            for e in range(s):
                begin = 0
                for src in range(r):
                    n = int(recv[src, e, 0, hidden + 1])
                    packed_x[e, begin:begin + n] = recv[src, e, :n, :hidden].to(torch.bfloat16)
                    recv_src[e, begin:begin + n] = recv[src, e, :n, hidden].long()
                    received[e][src] = (begin, n)
                    begin += n
                count[e] = begin

        if not return_recv_hook:
            receive()
        handle = FakeHandle(sent, received, recv_src)
        return packed_x, count, handle, FakeEvent(), (receive if return_recv_hook else None)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor,
                            topk_weights: torch.Tensor, handle: FakeHandle,
                            use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: torch.Tensor | None = None, combine_wait_recv_cost_stats=None):
        r, s = self.group_size, len(handle.received)
        m = x.shape[1] // r
        assert x.dim() == 3 and x.is_contiguous() and x.dtype == torch.bfloat16
        assert x.shape[0] == s and x.shape[1] == r * m
        assert topk_idx.dim() == 2 and topk_idx.is_contiguous() and topk_idx.dtype == topk_idx_t
        assert topk_weights.dtype == torch.float32 and topk_weights.is_contiguous()
        assert topk_idx.shape == topk_weights.shape and topk_weights.shape[0] <= m
        assert not (async_finish and return_recv_hook)
        self.calls += 1
        hidden = x.shape[2]
        # back[src, e, i]: output of the i-th row src sent to this rank's local expert e
        back = torch.zeros(r, s, m, hidden, dtype=torch.float32)
        for e in range(s):
            for src, (begin, n) in enumerate(handle.received[e]):
                back[src, e, :n] = x[e, begin:begin + n].float()
        recv, work = self._exchange(back)
        num_tokens = topk_idx.shape[0]
        combined = out if out is not None else torch.empty(num_tokens, hidden,
                                                           dtype=torch.bfloat16)

        def receive() -> None:
            work.wait()
            acc = torch.zeros(num_tokens, hidden, dtype=torch.float32)
            for t in range(num_tokens):
                for k in range(topk_idx.shape[1]):
                    g = int(topk_idx[t, k])
                    if g < 0:
                        continue
                    dst, e = divmod(g, s)
                    row = int((handle.sent[dst][e] == t).nonzero()[0])
                    acc[t] += float(topk_weights[t, k]) * recv[dst, e, row]
            combined.copy_(acc.to(torch.bfloat16))

        if not return_recv_hook:
            receive()
        return combined, FakeEvent(), (receive if return_recv_hook else None)
