"""KV cache sizing on a GPU: profile the largest step, give the cache what is left.

Legend: `T` tokens of the profiling step, `S` its sequences, `V` vocab.

The budget is `gpu_memory_utilization` x total memory. From it go everything already on the
device (CUDA context, weights, other processes), the activation peak of the largest step the
scheduler can send (`max_num_batched_tokens` tokens, then logits for `max_num_seqs` rows), and a
reserve for the CUDA graphs' memory pool; the KV cache gets the rest.
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


@dataclass(slots=True)
class GpuMemoryPlan:
    total: int
    in_use: int  # context, weights, other processes: what the device holds before activations
    activation_peak: int
    graph_reserve: int
    utilization: float

    @property
    def kv_bytes(self) -> int:
        budget = int(self.total * self.utilization)
        return budget - self.in_use - self.activation_peak - self.graph_reserve

    def describe(self) -> str:
        gib = 2**30
        return (
            f"gpu_memory_utilization {self.utilization} x {self.total / gib:.1f} GiB = "
            f"{self.total * self.utilization / gib:.2f} GiB, less {self.in_use / gib:.2f} GiB in "
            f"use (weights, CUDA context, other processes), {self.activation_peak / gib:.2f} GiB "
            f"of activations and {self.graph_reserve / gib:.2f} GiB for CUDA graphs"
        )


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
        spec = layer.kv_cache_spec(runner.info.dtype)
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
        with set_forward_context(runner.attn_backend.build_metadata(common)):
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
    per_token = sum(layer.kv_cache_spec(runner.info.dtype).bytes_per_token for layer in layers)
    scratch = scratch_blocks * bs * per_token
    torch.cuda.empty_cache()
    return max(0, peak - scratch)


def plan_gpu_memory(runner, use_graphs: bool) -> GpuMemoryPlan:
    config = runner.config
    tokens = config.resolved_max_num_batched_tokens(runner.device)
    peak = profile_activation_peak(runner, tokens, config.max_num_seqs)
    free, total = torch.cuda.mem_get_info(runner.device)
    plan = GpuMemoryPlan(
        total=total,
        in_use=total - free,
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
