"""ModelRunner: a SchedulerOutput becomes tensors, one forward pass, and sampled tokens.

Legend: `T` tokens of the step, `S` scheduled sequences, `N` rows that need logits, `V` vocab.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from twinfer.config import EngineConfig
from twinfer.engine.scheduler import RunnerOutput, SampledToken, SchedulerOutput
from twinfer.layers.attention import (
    Attention,
    CommonAttentionMetadata,
    get_attn_backend,
    set_forward_context,
)
from twinfer.loader.model_loader import ModelInfo, load_model
from twinfer.runner.sampler import Sampler, SamplingMetadata, compute_token_logprobs

logger = logging.getLogger(__name__)

# NOTE: the pool is zeroed (padded gathers must never read NaN), so its pages are touched at
# start: 1 GiB keeps start-up quick and leaves RAM for the weights; raise --kv-cache-memory-bytes.
_CPU_DEFAULT_KV_BYTES = 2**30


class ModelRunner:
    def __init__(
        self, config: EngineConfig, info: ModelInfo, model: nn.Module | None = None
    ) -> None:
        self.config = config
        self.info = info
        self.device = info.device
        self.block_size = config.block_size
        self.model = model if model is not None else load_model(info)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.attn_backend = get_attn_backend()
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        # Next prompt position whose logprob is still owed (survives preemption and recompute).
        self.prompt_logprobs_pos: dict[str, int] = {}
        self.num_blocks = 0

    # ---- KV cache ----
    def kv_bytes_per_token(self) -> int:
        dtype = self.info.dtype
        return sum(layer.kv_cache_spec(dtype).bytes_per_token for layer in self.attn_layers)

    def initialize_kv_cache(self) -> int:
        """Size and allocate the paged KV cache; returns the number of blocks."""
        per_block = self.kv_bytes_per_token() * self.block_size
        if self.config.num_gpu_blocks_override is not None:
            num_blocks = self.config.num_gpu_blocks_override
        elif self.config.kv_cache_memory_bytes is not None:
            num_blocks = self.config.kv_cache_memory_bytes // per_block
        else:
            want = self.config.max_num_seqs * self.info.max_model_len * per_block // self.block_size
            num_blocks = min(want, _CPU_DEFAULT_KV_BYTES) // per_block
        capacity = num_blocks * self.block_size
        if capacity < self.info.max_model_len:
            largest = capacity
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.block_size}) "
                f"but max_model_len is {self.info.max_model_len}; lower --max-model-len to at most "
                f"{largest} or give the cache more memory (--kv-cache-memory-bytes)."
            )
        for layer in self.attn_layers:
            spec = layer.kv_cache_spec(self.info.dtype)
            shape = self.attn_backend.kv_cache_shape(spec, num_blocks, self.block_size)
            # zeros, not empty: padded gathers must never read NaN garbage.
            layer.kv_cache = torch.zeros(shape, dtype=spec.dtype, device=self.device)
        self.num_blocks = num_blocks
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB), max concurrency %.1f at "
            "max_model_len %d",
            num_blocks,
            self.block_size,
            capacity,
            num_blocks * per_block / 2**30,
            capacity / self.info.max_model_len,
            self.info.max_model_len,
        )
        return num_blocks

    # ---- one step ----
    def free_requests(self, request_ids: list[str]) -> None:
        """Drop the per-request state of requests that left the engine."""
        for rid in request_ids:
            self.generators.pop(rid, None)
            self.prompt_logprobs_pos.pop(rid, None)

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> RunnerOutput:
        self.free_requests(sched.finished_req_ids)

        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []  # token index whose logits are sampled, per sampling request
        sample_reqs = []
        prompt_lp: list[tuple[str, int, int, int]] = []  # (req id, first row, count, top-n)
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        for item in sched.scheduled:
            req = item.request
            start = req.num_computed_tokens
            end = start + item.num_new_tokens
            base = len(input_ids)
            input_ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            blocks = item.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(end - start)
            seq_lens.append(end)
            query_start_loc.append(len(input_ids))
            if end == req.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_reqs.append(req)
            if req.sampling_params.prompt_logprobs is not None:
                # Position p's logits score prompt token p + 1.
                first = max(start, self.prompt_logprobs_pos.get(req.request_id, 0))
                last = min(end, req.num_prompt_tokens - 1)
                if last > first:
                    n = req.sampling_params.prompt_logprobs
                    prompt_lp.append((req.request_id, len(prompt_rows), last - first, n))
                    prompt_rows.extend(base + p - start for p in range(first, last))
                    prompt_targets.extend(req.prompt_token_ids[first + 1 : last + 1])
                    self.prompt_logprobs_pos[req.request_id] = last

        max_blocks = max(len(item.block_ids) for item in sched.scheduled)
        block_table = torch.zeros(len(sched.scheduled), max_blocks, dtype=torch.long)
        for i, item in enumerate(sched.scheduled):
            block_table[i, : len(item.block_ids)] = torch.tensor(item.block_ids)
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_table=block_table.to(self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_size=bs,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        with set_forward_context(self.attn_backend.build_metadata(common)):
            hidden = self.model(ids, pos)  # [T, H]

        by_request = {item.request.request_id: SampledToken(None) for item in sched.scheduled}
        if sample_rows:
            self._sample(hidden, sample_rows, sample_reqs, by_request)
        if prompt_rows:
            self._prompt_logprobs(hidden, prompt_rows, prompt_targets, prompt_lp, by_request)
        return RunnerOutput(by_request)

    def _sample(self, hidden, rows, reqs, by_request) -> None:
        logits = self.model.compute_logits(hidden[rows])  # [N, V] float32
        for req in reqs:
            seed = req.sampling_params.seed
            if seed is not None and req.request_id not in self.generators:
                self.generators[req.request_id] = torch.Generator(self.device).manual_seed(seed)
        metadata = SamplingMetadata.build(
            params=[r.sampling_params for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            generators=[self.generators.get(r.request_id) for r in reqs],
            stop_token_ids=[_min_tokens_stop_ids(r) for r in reqs],
            vocab_size=logits.shape[-1],
            device=self.device,
        )
        out = self.sampler(logits, metadata)
        tokens = out.sampled_token_ids.tolist()
        lp_ids = out.logprob_token_ids.tolist() if out.logprob_token_ids is not None else None
        lp_vals = out.logprobs.tolist() if out.logprobs is not None else None
        ranks = out.sampled_ranks.tolist() if out.sampled_ranks is not None else None
        for i, req in enumerate(reqs):
            sampled = by_request[req.request_id]
            sampled.token_id = tokens[i]
            n = req.sampling_params.logprobs
            if n is not None and lp_ids is not None:
                sampled.logprobs = (lp_ids[i][: n + 1], lp_vals[i][: n + 1], ranks[i])

    def _prompt_logprobs(self, hidden, rows, targets, spans, by_request) -> None:
        logits = self.model.compute_logits(hidden[rows])  # [P, V]
        target = torch.tensor(targets, dtype=torch.long, device=logits.device)
        ids, vals, ranks = compute_token_logprobs(logits, target, max(s[3] for s in spans))
        ids_l, vals_l, ranks_l = ids.tolist(), vals.tolist(), ranks.tolist()
        for rid, row, count, n in spans:
            by_request[rid].prompt_logprobs = (
                [r[: n + 1] for r in ids_l[row : row + count]],
                [r[: n + 1] for r in vals_l[row : row + count]],
                ranks_l[row : row + count],
            )


def _min_tokens_stop_ids(req) -> frozenset[int]:
    params = req.sampling_params
    if req.num_output_tokens >= params.min_tokens:
        return frozenset()
    eos = frozenset() if params.ignore_eos else req.eos_token_ids
    return eos | frozenset(params.stop_token_ids)
