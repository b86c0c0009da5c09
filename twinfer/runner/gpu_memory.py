"""KV cache sizing on a GPU: profile the largest step, give the cache what is left.

Legend: `T` tokens of the profiling step, `S` its sequences, `V` vocab.

The budget is `gpu_memory_utilization` x total memory, for this engine alone (vLLM's meaning:
another process on the same GPU does not shrink it, it only bounds what is free). From it go
what the engine adds to the device (weights, cuBLAS workspaces), the activation peak of the
largest step the scheduler can send (`max_num_batched_tokens` tokens, then logits for
`max_num_seqs` rows), and a reserve for the CUDA graphs' memory pool; the KV cache gets the rest,
and never more than is actually free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from twinfer.layers.attention import CommonAttentionMetadata, set_forward_context

logger = logging.getLogger(__name__)

# NOTE: decode graphs need little memory of their own (activations of <= max_num_seqs tokens in a
# shared pool, measured ~10-100 MiB); the reserve also covers cuBLAS workspaces made at capture.
CUDA_GRAPH_RESERVE_BYTES = 512 * 2**20


# What free memory must keep after the KV cache: allocator slack and late small allocations.
FREE_MARGIN_BYTES = 256 * 2**20


def memory_in_use(device: torch.device) -> int:
    """This process's device memory before the engine loads; what the engine adds is measured
    against it. NOTE: torch's own counter, not the device's free memory, so that other processes
    allocating meanwhile are not counted as ours (they only bound what is free)."""
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)


@dataclass(slots=True)
class GpuMemoryPlan:
    total: int
    free: int  # free on the device after profiling (others' use counts here)
    ours: int  # what this engine added: weights, workspaces, non-torch growth
    activation_peak: int
    graph_reserve: int
    utilization: float

    @property
    def _by_budget(self) -> int:
        budget = int(self.total * self.utilization)
        return budget - self.ours - self.activation_peak - self.graph_reserve

    @property
    def _by_free(self) -> int:
        return self.free - self.activation_peak - self.graph_reserve - FREE_MARGIN_BYTES

    @property
    def kv_bytes(self) -> int:
        return min(self._by_budget, self._by_free)

    def describe(self) -> str:
        gib = 2**30
        text = (
            f"gpu_memory_utilization {self.utilization} x {self.total / gib:.1f} GiB = "
            f"{self.total * self.utilization / gib:.2f} GiB, less {self.ours / gib:.2f} GiB of "
            f"weights and workspaces, {self.activation_peak / gib:.2f} GiB of activations and "
            f"{self.graph_reserve / gib:.2f} GiB for CUDA graphs"
        )
        if self._by_free < self._by_budget:
            text += f"; only {self.free / gib:.2f} GiB is free (other processes use the GPU)"
        return text


@torch.inference_mode()
def profile_activation_peak(runner, num_tokens: int, num_seqs: int) -> int:
    """Bytes the largest step allocates beyond the weights: one forward over `num_tokens` tokens in
    `num_seqs` sequences (each at most max_model_len) with a scratch KV cache, then logits and
    logprobs of `num_seqs` rows."""
    device = runner.device
    bs = runner.block_size
    num_seqs = max(1, min(num_seqs, num_tokens))
    lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    lens = [min(n, runner.info.max_model_len) for n in lens]
    blocks_per = [-(-n // bs) for n in lens]
    layers = runner.attn_layers
    saved = [layer.kv_cache for layer in layers]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    scratch_blocks = sum(blocks_per)
    for layer in layers:
        spec = layer.kv_cache_spec(runner.kv_cache_dtype)
        shape = runner.attn_backend.kv_cache_shape(spec, scratch_blocks, bs)
        layer.kv_cache = torch.zeros(shape, dtype=spec.dtype, device=device)
    try:
        first = 0
        table = torch.zeros(num_seqs, max(blocks_per), dtype=torch.long)
        slots: list[int] = []
        for i, (n, nb) in enumerate(zip(lens, blocks_per, strict=True)):
            table[i, :nb] = torch.arange(first, first + nb)
            slots.extend(range(first * bs, first * bs + n))
            first += nb
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        common = CommonAttentionMetadata(
            query_start_loc=starts,
            query_lens=lens,
            seq_lens=lens,
            block_table=table.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_size=bs,
            query_start_loc_tensor=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens_tensor=torch.tensor(lens, dtype=torch.int32, device=device),
        )
        total = sum(lens)
        ids = torch.zeros(total, dtype=torch.long, device=device)
        pos = torch.cat([torch.arange(n, device=device) for n in lens])
        metadata = runner.attn_backend.build_metadata(common)
        with set_forward_context(metadata), runner.stream_session(total):
            hidden = runner.model(ids, pos)  # [T, H]
        logits = runner.model.compute_logits(hidden[: min(num_seqs, total)])  # [S, V]
        logits.log_softmax(-1).topk(min(20, logits.shape[-1]), dim=-1)
        del hidden, logits
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    finally:
        for layer, cache in zip(layers, saved, strict=True):
            layer.kv_cache = cache
    # The scratch cache is not an activation: it is what the real cache will hold.
    per_token = sum(layer.kv_cache_spec(runner.kv_cache_dtype).bytes_per_token for layer in layers)
    scratch = scratch_blocks * bs * per_token
    torch.cuda.empty_cache()
    return max(0, peak - scratch)


def plan_gpu_memory(runner, use_graphs: bool, baseline: int) -> GpuMemoryPlan:
    """`baseline`: memory_in_use() taken before the weights were loaded."""
    config = runner.config
    tokens = config.resolved_max_num_batched_tokens(runner.device, runner.info.has_host_experts)
    peak = profile_activation_peak(runner, tokens, config.max_num_seqs)
    if runner.streamer is not None:
        # NOTE: a streamed prompt chunk runs beside the next steps (background prefill), so two
        # steps' activations can be live at once.
        peak *= 2
    free, total = torch.cuda.mem_get_info(runner.device)
    plan = GpuMemoryPlan(
        total=total,
        free=free,
        ours=torch.cuda.memory_reserved(runner.device) - baseline,
        activation_peak=peak,
        graph_reserve=CUDA_GRAPH_RESERVE_BYTES if use_graphs else 0,
        utilization=config.gpu_memory_utilization,
    )
    logger.info("GPU memory: %s", plan.describe())
    if plan.kv_bytes <= 0:
        raise ValueError(
            f"no GPU memory is left for the KV cache: {plan.describe()}. Raise "
            "--gpu-memory-utilization, lower --max-num-batched-tokens or --max-num-seqs, or use "
            "--enforce-eager."
        )
    return plan
