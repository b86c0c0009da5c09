"""CUDA graphs for decode steps: one graph per padded batch size, replayed with static buffers.

Legend: `B` padded batch (a capture size), `b` real sequences of the step, `Nb` KV blocks per
sequence at max_model_len, `H` hidden.

A decode step (every sequence has one query token) is the same kernels at every step; only the
contents of a few small tensors change. Each graph is captured once over static buffers: token
ids, positions, cache slots, the block table and the context lengths. A step copies its values
into those buffers (two host-to-device copies from pinned staging, one device copy for the
block table) and replays the graph of the smallest capture size that holds it. Padded rows
write no KV (slot -1) and attend to nothing (context length 0).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from twinfer.layers.attention import AttentionBackend, CommonAttentionMetadata
from twinfer.layers.attention.context import set_forward_context

logger = logging.getLogger(__name__)


def capture_sizes(max_size: int) -> list[int]:
    """vLLM's buckets: 1, 2, 4, then every multiple of 8 up to max_size (and max_size itself)."""
    sizes = [s for s in (1, 2, 4) if s <= max_size]
    sizes += range(8, max_size + 1, 8)
    if sizes[-1] != max_size:
        sizes.append(max_size)
    return sizes


class CudaGraphRunner:
    """Decode forwards of `model` replayed from graphs; `run()` is the whole per-step interface."""

    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        block_size: int,
        max_model_len: int,
        max_batch: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_batch)
        b = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        # int64 staging: [ids B | positions B | slots B | block table rows b x nb (packed)].
        self._host64 = torch.empty(3 * b + b * self.max_blocks, dtype=torch.long, pin_memory=True)
        self._dev64 = torch.zeros_like(self._host64, device=device)
        self._host32 = torch.empty(b, dtype=torch.int32, pin_memory=True)  # context lengths
        self._np64 = self._host64.numpy()
        self._np32 = self._host32.numpy()
        self.input_ids = self._dev64[:b]  # [B]
        self.positions = self._dev64[b : 2 * b]  # [B]
        self.slot_mapping = self._dev64[2 * b : 3 * b]  # [B]
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=device)  # [B]
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)  # [B+1]
        self.block_table = torch.zeros(b, self.max_blocks, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # [B, H] per size, in the graphs' pool

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def capture(self) -> None:
        """Capture every size, largest first so the smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info()[0]
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        pool = None
        for size in reversed(self.sizes):
            metadata = self.backend.build_metadata(self._common(size))
            ids, pos = self.input_ids[:size], self.positions[:size]
            with set_forward_context(metadata):
                # Warm-up outside the graph: Triton compiles, cuBLAS picks its kernels here.
                self.model(ids, pos)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(ids, pos)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        used = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
        logger.info(
            "captured %d CUDA graphs for decode batches %d..%d in %.1f s (%.0f MiB)",
            len(self.sizes),
            self.sizes[0],
            self.sizes[-1],
            time.perf_counter() - start,
            used,
        )

    def _common(self, size: int) -> CommonAttentionMetadata:
        return CommonAttentionMetadata(
            query_start_loc=list(range(size + 1)),
            query_lens=[1] * size,
            seq_lens=[1] * size,
            block_table=self.block_table[:size],
            slot_mapping=self.slot_mapping[:size],
            block_size=self.block_size,
            query_start_loc_tensor=self.query_start_loc[: size + 1],
            seq_lens_tensor=self.seq_lens[:size],
            max_seq_len=self.max_model_len,  # one graph serves every context length
        )

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        block_ids: list[list[int]],
    ) -> torch.Tensor:
        """One decode step of b = len(input_ids) sequences -> hidden [b, H] (a view, valid until
        the next replay)."""
        b = len(input_ids)
        size = next(s for s in self.sizes if s >= b)
        big = self.max_batch
        nb = max(len(row) for row in block_ids)
        h, h32 = self._np64, self._np32
        h[:b] = input_ids
        h[b:size] = 0
        h[big : big + b] = positions
        h[big + b : big + size] = 0
        h[2 * big : 2 * big + b] = slots
        h[2 * big + b : 2 * big + size] = -1  # padded rows write no KV
        table = h[3 * big : 3 * big + b * nb].reshape(b, nb)
        for i, row in enumerate(block_ids):
            table[i, : len(row)] = row
        h32[:b] = seq_lens
        h32[b:size] = 0  # padded rows attend to nothing
        n64 = 3 * big + b * nb
        self._dev64[:n64].copy_(self._host64[:n64], non_blocking=True)
        self.seq_lens[:size].copy_(self._host32[:size], non_blocking=True)
        self.block_table[:b, :nb].copy_(self._dev64[3 * big : n64].view(b, nb))
        self.graphs[size].replay()
        return self.outputs[size][:b]
