"""ModelRunner: a SchedulerOutput becomes tensors, one forward pass, and sampled tokens.

Legend: `T` tokens of the step, `S` scheduled sequences, `N` rows that need logits, `V` vocab.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from twinfer.config import EngineConfig
from twinfer.engine.scheduler import (
    RunnerOutput,
    SampledToken,
    ScheduledRequest,
    SchedulerOutput,
)
from twinfer.hybrid.gpu_prefill import PrefillStreamer
from twinfer.layers.attention import (
    Attention,
    CommonAttentionMetadata,
    get_attn_backend,
    set_forward_context,
)
from twinfer.layers.moe import MoELayer
from twinfer.loader.model_loader import ModelInfo, load_model
from twinfer.runner.cuda_graphs import CudaGraphRunner
from twinfer.runner.gpu_memory import memory_in_use, plan_gpu_memory
from twinfer.runner.sampler import Sampler, SamplingMetadata, compute_token_logprobs

logger = logging.getLogger(__name__)

# NOTE: the pool is zeroed (padded gathers must never read NaN), so its pages are touched at
# start: 1 GiB keeps start-up quick and leaves RAM for the weights; raise --kv-cache-memory-bytes.
_CPU_DEFAULT_KV_BYTES = 2**30
_PROMPT_LOGITS_ROWS = 256


@dataclass(slots=True)
class StepInputs:
    """A step's scheduled requests flattened into the forward's inputs."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_ids: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # token index sampled, per request
    sample_reqs: list = field(default_factory=list)
    prompt_lp: list[tuple[str, int, int, int]] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)


@dataclass(slots=True)
class BackgroundPrefill:
    """A streamed prompt chunk enqueued on the prefill stream beside the decode steps."""

    item: ScheduledRequest
    inputs: StepInputs
    last_hidden: torch.Tensor | None  # [1, H] when the chunk ends the prompt (sampled later)
    done: torch.cuda.Event


class ModelRunner:
    def __init__(
        self, config: EngineConfig, info: ModelInfo, model: nn.Module | None = None
    ) -> None:
        self.config = config
        self.info = info
        self.device = info.device
        self.block_size = config.block_size
        self.gpu_baseline = memory_in_use(self.device) if self.device.type == "cuda" else 0
        self.model = model if model is not None else load_model(info)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        # NOTE: the runner picks the kernels for its device; model files never name a backend.
        attn_backend = config.resolved_backend("attention_backend", self.device)
        self.attn_backend = get_attn_backend(attn_backend)
        self.kv_cache_dtype = config.resolved_kv_cache_dtype(info.dtype, attn_backend)
        for layer in self.attn_layers:
            layer.backend = self.attn_backend
        moe_backend = config.resolved_backend("moe_backend", self.device)
        moe_layers = [m for m in self.model.modules() if isinstance(m, MoELayer)]
        for module in moe_layers:
            module.set_backend(moe_backend)
        # Host experts: the CPU expert engine, told each step how many rows are real.
        plan = info.moe_plan
        self.cpu_experts = plan.cpu_engine() if plan is not None and plan.host_layers else None
        device_moe = {moe_backend for m in moe_layers if not m.on_host}
        on_gpu_with_cpu_experts = self.cpu_experts is not None and self.device.type == "cuda"
        self.step_done = torch.cuda.Event(blocking=True) if on_gpu_with_cpu_experts else None
        self.streamer = self._make_streamer(moe_layers) if on_gpu_with_cpu_experts else None
        # Streamed prompt chunks that never wait on the host run on their own stream, beside
        # the decode steps (one at a time: they share the staging buffers).
        self._green_context = None  # keeps the shared stream's SM partition alive
        # A chunk beside decode steps runs on `shared_stream` (fewer SMs), alone on its own.
        self.shared_stream = self._shared_stream() if self.streamer else None
        self.alone_stream = torch.cuda.Stream(self.device) if self.streamer else None
        # NOTE: steps then run on a high-priority stream: the GPU's block scheduler hands SMs
        # freed by a chunk's long kernels to a decode's kernels first.
        self.step_stream = torch.cuda.Stream(self.device, priority=-100) if self.streamer else None
        self.background: BackgroundPrefill | None = None
        self.background_chunks = 0  # since start
        self.use_cuda_graphs = config.use_cuda_graphs(self.device)
        if self.use_cuda_graphs and (self.attn_backend.name != "triton" or device_moe - {"triton"}):
            # The torch kernels sync with the host (the expert loop, SDPA masks): not capturable.
            logger.info("CUDA graphs off: they need the triton attention and MoE backends")
            self.use_cuda_graphs = False
        if self.use_cuda_graphs and self.cpu_experts is not None and not self.cpu_experts.native:
            logger.info("CUDA graphs off: host experts without the native engine sync the host")
            self.use_cuda_graphs = False
        self.graphs: CudaGraphRunner | None = None
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        # Next prompt position whose logprob is still owed (survives preemption and recompute).
        self.prompt_logprobs_pos: dict[str, int] = {}
        self.num_blocks = 0

    def _make_streamer(self, moe_layers: list[MoELayer]) -> PrefillStreamer | None:
        """GPU prefill streaming of the host experts, unless off or the CPU always wins."""
        config = self.config
        host = [m for m in moe_layers if m.host_experts is not None]
        if config.gpu_prefill_min_tokens == 0 or not self.cpu_experts.native or not host:
            return None
        budget = config.resolved_max_num_batched_tokens(self.device, True)
        streamer = PrefillStreamer(
            host, self.device, config.gpu_prefetch_window, config.gpu_prefill_min_tokens, budget
        )
        if streamer.min_tokens is None:
            streamer.close()
            return None
        logger.info(
            "GPU prefill streaming: %d staging buffer(s) of %.0f MiB in VRAM",
            len(streamer.buffers),
            streamer.layer_bytes / 2**20,
        )
        return streamer

    def _shared_stream(self) -> torch.cuda.Stream:
        """The stream of chunks that run beside decode steps: on a green context that leaves
        a quarter of the SMs to the decodes when the driver has them.

        NOTE: a chunk's attention runs CTAs for milliseconds (a 128-query tile against a 32K
        context), which no stream priority preempts: a decode kernel waited ~3.5 ms behind them
        on the H100, ~0.15 ms with 16 SMs out of the chunk's reach. A decode's wider kernels
        (lm_head, projections) still spill onto the chunk's SMs: keeping 40 SMs took the decode's
        ITL beside a 32K prefill from 2.23x to 1.96x its solo value, and the prefill from
        0.60 s to 0.69 s (0.52 s on every SM), so chunks with no decode beside them take all."""
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        keep = max(8, -(-sms // 32) * 8)  # 40 of an H100's 132
        try:
            from torch.cuda.green_contexts import GreenContext

            self._green_context = GreenContext.create(
                num_sms=sms - keep, device_id=self.device.index or 0
            )
            stream = self._green_context.Stream()
        except (ImportError, AttributeError, RuntimeError) as exc:
            logger.info("background prefill on a plain stream (no green contexts: %s)", exc)
            return torch.cuda.Stream(self.device)
        logger.info("background prefill on %d of %d SMs (a green context)", sms - keep, sms)
        return stream

    def runs_in_background(self, num_tokens: int) -> bool:
        """Whether a prompt chunk of `num_tokens` tokens runs beside the decode steps."""
        return self.streamer is not None and self.streamer.in_background(num_tokens)

    @contextlib.contextmanager
    def stream_session(self, num_tokens: int) -> Iterator[None]:
        """Host experts of a forward of `num_tokens` stream to the GPU when that is faster (and
        no background chunk holds the staging buffers)."""
        if self.streamer is None or self.background is not None:
            yield
            return
        with self.streamer.streaming(self.streamer.session(num_tokens)):
            yield

    # ---- KV cache ----
    def kv_bytes_per_token(self) -> int:
        dtype = self.kv_cache_dtype
        return sum(layer.kv_cache_spec(dtype).bytes_per_token for layer in self.attn_layers)

    def initialize_kv_cache(self) -> int:
        """Size and allocate the paged KV cache; returns the number of blocks."""
        per_block = self.kv_bytes_per_token() * self.block_size
        plan = None
        if self.config.num_gpu_blocks_override is not None:
            num_blocks = self.config.num_gpu_blocks_override
        elif self.config.kv_cache_memory_bytes is not None:
            num_blocks = self.config.kv_cache_memory_bytes // per_block
        elif self.device.type == "cuda":
            plan = plan_gpu_memory(self, self.use_cuda_graphs, self.gpu_baseline)
            num_blocks = plan.kv_bytes // per_block
        else:
            want = self.config.max_num_seqs * self.info.max_model_len * per_block // self.block_size
            num_blocks = min(want, _CPU_DEFAULT_KV_BYTES) // per_block
        capacity = num_blocks * self.block_size
        if capacity < self.info.max_model_len:
            fix = (
                "raise --gpu-memory-utilization, lower --max-num-batched-tokens, or set "
                "--kv-cache-memory-bytes"
                if plan is not None
                else "give the cache more memory (--kv-cache-memory-bytes)"
            )
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.block_size}"
                + (f"; {plan.describe()}" if plan is not None else "")
                + f") but max_model_len is {self.info.max_model_len}; lower --max-model-len to "
                f"at most {capacity}, or {fix}."
            )
        for layer in self.attn_layers:
            spec = layer.kv_cache_spec(self.kv_cache_dtype)
            shape = self.attn_backend.kv_cache_shape(spec, num_blocks, self.block_size)
            # zeros, not empty: padded gathers must never read NaN garbage.
            layer.kv_cache = torch.zeros(shape, dtype=spec.dtype, device=self.device)
        self.num_blocks = num_blocks
        if self.use_cuda_graphs:
            size = self.config.compilation_config.max_cudagraph_capture_size
            self.graphs = CudaGraphRunner(
                self.model,
                self.attn_backend,
                self.block_size,
                self.info.max_model_len,
                min(size or self.config.max_num_seqs, self.config.max_num_seqs),
                self.device,
            )
            self.graphs.capture()
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s), max concurrency %.1f at "
            "max_model_len %d",
            num_blocks,
            self.block_size,
            capacity,
            num_blocks * per_block / 2**30,
            str(self.kv_cache_dtype).removeprefix("torch."),
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
        """Enqueue the step's background chunk (if any), run its foreground batch, and collect
        a finished background chunk (waiting for it when the step has nothing else)."""
        self.free_requests(sched.finished_req_ids)
        with self._on_step_stream():
            if sched.background is not None:
                self._launch_background(sched.background, beside_decodes=bool(sched.scheduled))
            by_request = self._run(sched.scheduled) if sched.scheduled else {}
            background = self._collect_background(wait=not sched.scheduled)
        return RunnerOutput(by_request, background)

    @contextlib.contextmanager
    def _on_step_stream(self) -> Iterator[None]:
        if self.step_stream is None:
            yield
            return
        self.step_stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self.step_stream):
            yield

    def _inputs(self, scheduled: list[ScheduledRequest]) -> StepInputs:
        bs = self.block_size
        x = StepInputs()
        for item in scheduled:
            req = item.request
            start = req.num_computed_tokens
            end = start + item.num_new_tokens
            base = len(x.input_ids)
            x.input_ids.extend(req.all_token_ids[start:end])
            x.positions.extend(range(start, end))
            blocks = item.block_ids
            x.slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            x.query_lens.append(end - start)
            x.seq_lens.append(end)
            x.query_start_loc.append(len(x.input_ids))
            x.block_ids.append(blocks)
            if end == req.num_tokens:
                x.sample_rows.append(len(x.input_ids) - 1)
                x.sample_reqs.append(req)
            if req.sampling_params.prompt_logprobs is not None:
                # Position p's logits score prompt token p + 1.
                first = max(start, self.prompt_logprobs_pos.get(req.request_id, 0))
                last = min(end, req.num_prompt_tokens - 1)
                if last > first:
                    n = req.sampling_params.prompt_logprobs
                    x.prompt_lp.append((req.request_id, len(x.prompt_rows), last - first, n))
                    x.prompt_rows.extend(base + p - start for p in range(first, last))
                    x.prompt_targets.extend(req.prompt_token_ids[first + 1 : last + 1])
                    self.prompt_logprobs_pos[req.request_id] = last
        return x

    def _run(self, scheduled: list[ScheduledRequest]) -> dict[str, SampledToken]:
        x = self._inputs(scheduled)
        if self.cpu_experts is not None:
            self.cpu_experts.set_num_tokens(len(x.input_ids))
        graphs = self.graphs
        if graphs is not None and len(x.input_ids) == len(x.block_ids) <= graphs.max_batch:
            # Every sequence has one query token: a decode step, replayed from a CUDA graph.
            hidden = graphs.run(x.input_ids, x.positions, x.slots, x.seq_lens, x.block_ids)
        else:
            hidden = self._forward_eager(x)  # [T, H]

        by_request = {item.request.request_id: SampledToken(None) for item in scheduled}
        if x.sample_rows:
            self._sample(hidden, x.sample_rows, x.sample_reqs, by_request)
        if x.prompt_rows:
            self._prompt_logprobs(hidden, x.prompt_rows, x.prompt_targets, x.prompt_lp, by_request)
        return by_request

    def _launch_background(self, item: ScheduledRequest, beside_decodes: bool) -> None:
        """Enqueue a streamed prompt chunk on the prefill stream and return at once: nothing in
        its forward waits on the host, so decode steps keep running on the main stream."""
        if self.background is not None:
            raise RuntimeError("a background prefill chunk is already in flight")
        x = self._inputs([item])
        stream = self.shared_stream if beside_decodes else self.alone_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            hidden = self._forward_eager(x)
            last = hidden[-1:] if x.sample_rows else None
            done = torch.cuda.Event(blocking=True)
            done.record(stream)
        self.background = BackgroundPrefill(item, x, last, done)
        self.background_chunks += 1

    def _collect_background(self, wait: bool) -> SampledToken | None:
        """The in-flight chunk's result once its forward finished (the prompt's first token is
        sampled here, on the main stream); None while it runs."""
        bg = self.background
        if bg is None or not (bg.done.query() or wait):
            return None
        bg.done.synchronize()  # asleep (a blocking event), not spinning
        self.background = None
        rid = bg.item.request.request_id
        by_request = {rid: SampledToken(None)}
        if bg.last_hidden is not None:
            self._sample(bg.last_hidden, [0], bg.inputs.sample_reqs, by_request)
        return by_request[rid]

    def _forward_eager(self, x: StepInputs) -> torch.Tensor:  # [T, H]
        dev = self.device
        block_ids = x.block_ids
        max_blocks = max(len(row) for row in block_ids)
        block_table = torch.zeros(len(block_ids), max_blocks, dtype=torch.long)
        for i, row in enumerate(block_ids):
            block_table[i, : len(row)] = torch.tensor(row)
        on_gpu = dev.type == "cuda"
        common = CommonAttentionMetadata(
            query_start_loc=x.query_start_loc,
            query_lens=x.query_lens,
            seq_lens=x.seq_lens,
            block_table=block_table.to(dev),
            slot_mapping=torch.tensor(x.slots, dtype=torch.long, device=dev),
            block_size=self.block_size,
            query_start_loc_tensor=(
                torch.tensor(x.query_start_loc, dtype=torch.int32, device=dev) if on_gpu else None
            ),
            seq_lens_tensor=torch.tensor(x.seq_lens, dtype=torch.int32, device=dev)
            if on_gpu
            else None,
        )
        if on_gpu and len(x.input_ids) == len(block_ids):
            # NOTE: a decode step splits each context as a captured graph does (by the
            # max_model_len bound), so --enforce-eager sums attention in the same order.
            common.max_seq_len = self.info.max_model_len
        ids = torch.tensor(x.input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(x.positions, dtype=torch.long, device=dev)
        metadata = self.attn_backend.build_metadata(common)
        with set_forward_context(metadata), self.stream_session(len(x.input_ids)):
            return self.model(ids, pos)

    def _sample(self, hidden, rows, reqs, by_request) -> None:
        # NOTE: a decode step samples every row: no index tensor, whose host-to-device copy
        # would block the host until the GPU finished the step and leave the GPU idle while
        # the host then launched the sampler (0.3 ms a step on the H100).
        if rows != list(range(hidden.shape[0])):
            hidden = hidden[rows]
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
            vocab_size=self.info.vocab_size,
            device=self.device,
        )
        if metadata.plain_greedy:
            # NOTE: the argmax of model-dtype logits is that of their float32 copies (the cast
            # is exact), so greedy decoding skips the cast: a kernel and half the bytes a step.
            out = self.sampler.greedy(self.model.compute_logits(hidden, float32=False))
        else:
            out = self.sampler(self.model.compute_logits(hidden), metadata)  # [N, V] float32
        if self.step_done is not None:
            # NOTE: wait asleep, not in CUDA's spinning copy: the CPU expert threads need every
            # core while the step runs, and a spinning host thread would preempt one of them and
            # stall the pool's barriers for a scheduler time slice.
            self.step_done.record()
            self.step_done.synchronize()
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
        # NOTE: 256 rows of float32 logits at a time: a 2048-token prompt of a 152K vocab would
        # otherwise hold 1.2 GB of logits (twice, with log_softmax) that the KV sizing must
        # leave free.
        num_top = max(s[3] for s in spans)
        target = torch.tensor(targets, dtype=torch.long, device=hidden.device)
        ids_l: list = []
        vals_l: list = []
        ranks_l: list = []
        for start in range(0, len(rows), _PROMPT_LOGITS_ROWS):
            chunk = rows[start : start + _PROMPT_LOGITS_ROWS]
            logits = self.model.compute_logits(hidden[chunk])  # [P, V]
            ids, vals, ranks = compute_token_logprobs(
                logits, target[start : start + len(chunk)], num_top
            )
            ids_l += ids.tolist()
            vals_l += vals.tolist()
            ranks_l += ranks.tolist()
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
