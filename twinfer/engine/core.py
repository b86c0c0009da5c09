"""EngineCore: the loop body of the engine, schedule -> execute -> update."""

from __future__ import annotations

from collections.abc import Iterable

from twinfer.config import EngineConfig
from twinfer.engine.kv_cache import KVCacheManager
from twinfer.engine.request import Request, RequestStatus
from twinfer.engine.scheduler import EngineCoreOutput, Scheduler
from twinfer.loader.model_loader import ModelInfo
from twinfer.runner.model_runner import ModelRunner


class EngineCore:
    """Owns the scheduler and the model runner; knows nothing of text (the client detokenizes)."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner

    @classmethod
    def from_config(cls, config: EngineConfig, info: ModelInfo) -> EngineCore:
        """Load the model, size the KV cache and build the scheduler over it."""
        runner = ModelRunner(config, info)
        num_blocks = runner.initialize_kv_cache()
        kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        scheduler = Scheduler(
            kv_cache,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.resolved_max_num_batched_tokens(
                info.device, info.has_host_experts
            ),
            max_model_len=info.max_model_len,
            runs_in_background=runner.runs_in_background if runner.streamer else None,
        )
        return cls(scheduler, runner)

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_work(self) -> bool:
        """Requests to run, or finished ones whose runner state a step must still drop."""
        return self.scheduler.has_unfinished_requests() or self.scheduler.has_finished_pending()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            self.runner.free_requests(scheduler_output.finished_req_ids)
            return []
        runner_output = self.runner.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def is_empty(self) -> bool:
        """The engine-empty invariant: no live request and every KV block free."""
        kv = self.scheduler.kv_cache
        return not self.scheduler.requests and kv.num_free_blocks == kv.num_blocks
