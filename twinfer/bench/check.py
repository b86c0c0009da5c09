"""`twinfer check`: what this machine can do, and the speed bounds that implies for a model.

Measures the CPU (model, ISA flags, cores, NUMA, DRAM read GB/s with all cores, bf16 matmul) and
the GPU (HBM GB/s, bf16 TFLOP/s, pinned PCIe GB/s each way), and turns a model's config.json into
bytes and FLOPs per step (`ModelCost`) so that benchmarks print each figure next to its bound.
The pieces (`measure_dram_gbps`, `measure_hbm_gbps`, `measure_bf16_tflops`, ...) work alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

GiB = 2**30
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(slots=True)
class PlatformReport:
    """One machine's measured capabilities; GPU fields are None without CUDA (or with --no-gpu)."""

    cpu_model: str
    cpu_flags: dict[str, bool]
    physical_cores: int
    logical_cpus: int
    usable_cpus: int  # this process's affinity (a container may get fewer than logical_cpus)
    numa_nodes: int
    numa_cpus: dict[str, str]  # "node0" -> cpulist "0-31,64-95"
    dram_total_gib: float
    dram_read_gbps: float
    dram_method: str
    dram_bytes: int
    cpu_bf16_tflops: float | None = None
    gpu_name: str | None = None
    gpu_count: int = 0
    gpu_memory_gib: float | None = None
    gpu_sms: int | None = None
    hbm_gbps: float | None = None
    bf16_tflops: float | None = None
    h2d_gbps: float | None = None
    d2h_gbps: float | None = None
    seconds: float = 0.0  # how long the measurement took
    errors: list[str] = field(default_factory=list)  # GPU measurements that failed, and why

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlatformReport:
        return cls(**data)


# ---- CPU ----------------------------------------------------------------------------------------
def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def parse_cpulist(text: str) -> list[int]:
    """Kernel cpulist "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpu_info() -> tuple[str, dict[str, bool]]:
    """CPU model name and the ISA flags that matter for the CPU kernels (from /proc/cpuinfo)."""
    model, flags = "", set()
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86, arm64
            flags = set(value.split())
    model = model or platform.processor() or platform.machine() or "unknown"
    return model, {f: f in flags for f in _FLAGS}


def cpu_topology() -> tuple[int, int, dict[str, str]]:
    """(physical cores, logical CPUs, NUMA node -> cpulist); one node when sysfs has none."""
    online = parse_cpulist(_read("/sys/devices/system/cpu/online") or "") or list(
        range(os.cpu_count() or 1)
    )
    cores = set()
    for cpu in online:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        cores.add((_read(f"{topo}/physical_package_id"), _read(f"{topo}/core_id") or cpu))
    nodes = {}
    node_dir = Path("/sys/devices/system/node")
    for node in sorted(node_dir.glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        nodes[node.name] = _read(node / "cpulist") or ""
    if not nodes:
        nodes = {"node0": f"0-{len(online) - 1}"}
    return len(cores), len(online), nodes


def l3_cache_bytes() -> int:
    """Total last-level cache over all its instances (0 when sysfs does not say)."""
    total, seen = 0, set()
    for cache in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        if _read(cache / "level") != "3" or (shared := _read(cache / "shared_cpu_list")) in seen:
            continue
        seen.add(shared)
        size = _read(cache / "size") or "0K"
        match = re.fullmatch(r"(\d+)([KMG]?)", size)
        if match:
            total += int(match[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2]]
    return total


def default_dram_bytes() -> int:
    """Buffer size for the DRAM test: 1 GiB, or 2x the total L3 when that is larger.

    NOTE: a buffer that fits in the L3 measures the cache, not DRAM (AMD X3D parts have >1 GiB of
    L3 a machine); streaming 2x the cache size leaves an LRU-like cache no hits.
    """
    return max(GiB, 2 * l3_cache_bytes())


def _best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):  # thread-pool start, page mapping, oneDNN kernel choice
        fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_dram_gbps(nbytes: int | None = None, repeats: int = 5) -> tuple[float, str]:
    """DRAM read GB/s with all cores: the best of several vectorised full-buffer reductions.

    Each method reads the whole buffer once per run (sum over float32 and an int64 view, amax over
    float32 and a uint8 view; ATen vectorises and parallelises each over the intra-op threads),
    with torch's default thread count and with every CPU of this process's affinity. Returns
    (GB/s of the best run of the best method, a string naming that method).
    NOTE: best, not median: an under-measured bound would inflate every ratio against it.
    """
    nbytes = default_dram_bytes() if nbytes is None else nbytes
    if nbytes < 2**20:
        raise ValueError(f"--dram-bytes must be at least 1 MiB, got {nbytes}")
    # NOTE: written, not torch.zeros: untouched calloc pages all map to one zero page, which the
    # cache serves. fill_ runs on all threads, so pages spread over the NUMA nodes of the threads.
    x = torch.empty(nbytes // 8 * 2, dtype=torch.float32).fill_(1.0)
    methods: dict[str, Callable[[], object]] = {
        "sum float32": x.sum,
        "sum int64-view": x.view(torch.int64).sum,
        "amax float32": x.amax,
        "amax uint8-view": x.view(torch.uint8).amax,
    }
    default_threads = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else default_threads
    # NOTE: screen every (threads, method) with 2 runs, then give the winner `repeats` more: a
    # slow CPU-only box stays within seconds, and the figure is still a best of >= repeats.
    screened: dict[tuple[int, str], float] = {}
    try:
        for threads in sorted({default_threads, usable}):
            torch.set_num_threads(threads)
            x.sum()  # start this many threads
            for name, fn in methods.items():
                screened[threads, name] = _best_seconds(fn, 2, warmup=0)
        threads, name = min(screened, key=screened.__getitem__)
        torch.set_num_threads(threads)
        seconds = min(screened[threads, name], _best_seconds(methods[name], repeats, warmup=0))
    finally:
        torch.set_num_threads(default_threads)
    how = f"torch {name}, {threads} threads, best of {repeats + 2} runs"
    return x.numel() * 4 / seconds / 1e9, how


def measure_cpu_bf16_tflops(max_n: int = 8192, repeats: int = 3) -> float:
    """CPU bf16 matmul TFLOP/s (AMX / AVX-512-BF16 through oneDNN where present).

    The size doubles from 1024 while one product takes under 20 ms, so a big CPU is measured on a
    matrix large enough to fill its cores and a small one finishes quickly.
    """
    n = 1024
    while True:
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        seconds = _best_seconds(lambda a=a, b=b: a @ b, 1)
        if seconds > 0.02 or n >= max_n:
            break
        n *= 2
    return 2 * n**3 / _best_seconds(lambda: a @ b, repeats) / 1e12


# ---- GPU (all timed with CUDA events after a warm-up; median of the runs) ----------------------
def _cuda_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_hbm_gbps(nbytes: int = GiB, repeats: int = 20, device: int | None = None) -> float:
    """HBM GB/s of a device-to-device copy: (read + write) bytes = 2 x nbytes per copy."""
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    with torch.cuda.device(dev):
        ms = _cuda_ms(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / (ms / 1e3) / 1e9


def measure_bf16_tflops(n: int = 8192, repeats: int = 20, device: int | None = None) -> float:
    """Dense bf16 matmul TFLOP/s: 2 n^3 FLOPs of an n x n product.

    NOTE: random operands, never zeros: zero data toggles fewer bits, draws less power and lets
    the clock boost higher than real weights would.
    """
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(a)
    with torch.cuda.device(dev):
        ms = _cuda_ms(lambda: torch.mm(a, b, out=out), repeats, warmup=5)
    return 2 * n**3 / (ms / 1e3) / 1e12


def measure_pcie_gbps(
    nbytes: int = GiB, repeats: int = 5, device: int | None = None
) -> tuple[float, float]:
    """(host-to-device, device-to-host) GB/s of non_blocking copies from/to a pinned host buffer."""
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        h2d = _cuda_ms(lambda: gpu.copy_(host, non_blocking=True), repeats, warmup=1)
        d2h = _cuda_ms(lambda: host.copy_(gpu, non_blocking=True), repeats, warmup=1)
    return nbytes / (h2d / 1e3) / 1e9, nbytes / (d2h / 1e3) / 1e9


def _measure_gpu(report: PlatformReport) -> None:
    props = torch.cuda.get_device_properties(0)
    report.gpu_name, report.gpu_count = props.name, torch.cuda.device_count()
    report.gpu_memory_gib, report.gpu_sms = props.total_memory / GiB, props.multi_processor_count
    # NOTE: each piece on its own: a GPU too small for one test still reports the others.
    for name, measure in (
        ("hbm_gbps", lambda: measure_hbm_gbps(device=0)),
        ("bf16_tflops", lambda: measure_bf16_tflops(device=0)),
        ("h2d_gbps", lambda: measure_pcie_gbps(device=0)),
    ):
        try:
            value = measure()
            if name == "h2d_gbps":
                report.h2d_gbps, report.d2h_gbps = value
            else:
                setattr(report, name, value)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            report.errors.append(f"{name}: {str(exc).splitlines()[0]}")
        finally:  # give the 1-2 GiB back to whoever runs next in this process
            torch.cuda.empty_cache()
            memory = getattr(getattr(torch, "accelerator", None), "memory", None)
            if empty_host_cache := getattr(memory, "empty_host_cache", None):  # torch >= 2.9
                empty_host_cache()  # the pinned buffer


def measure_platform(dram_bytes: int | None = None, gpu: bool = True) -> PlatformReport:
    """Measure everything `twinfer check` reports (about 10 s on a GPU machine)."""
    start = time.perf_counter()
    model, flags = cpu_info()
    physical, logical, nodes = cpu_topology()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    dram_total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    nbytes = default_dram_bytes() if dram_bytes is None else dram_bytes
    gbps, method = measure_dram_gbps(nbytes)
    report = PlatformReport(
        model, flags, max(physical, 1), logical, usable, len(nodes), nodes, dram_total, gbps,
        method, nbytes, measure_cpu_bf16_tflops(),
    )  # fmt: skip
    if gpu and torch.cuda.is_available():
        _measure_gpu(report)
    report.seconds = time.perf_counter() - start
    return report


# ---- model bounds -------------------------------------------------------------------------------
# Bytes per parameter of each weight format.
# NOTE: int4 is 4.5 bits, a 16-bit scale per 32 weights (the GGUF Q4_0 grid twinfer's CPU int4
# kernels read); the scales of fp8 / int8 (per channel) are negligible.
DTYPE_BYTES: dict[str, float] = {
    "bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "int8": 1, "int4": 0.5625,
}  # fmt: skip
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}


def parse_weight_dtype(name: str) -> str:
    """A weight format name (aliases bf16 / fp16 / fp32 accepted) -> its DTYPE_BYTES key."""
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown weight dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}")
    return key


def _get(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` set in a config.json dict or a transformers PretrainedConfig."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(slots=True)
class ModelCost:
    """Parameter counts of a decoder-only (MoE) transformer, and the bytes and FLOPs of its steps.

    Counts are totals over all layers, except `expert_params`: one routed expert of one layer.
    "Dense" weights are those every step reads whatever the routing: attention (q/k/v/o, q/k
    norms, biases), norms, dense MLPs, routers, shared experts. Legend: L layers, H hidden, V
    vocab, Hq / Hkv heads, D head size, E experts, K top-k, T tokens.
    NOTE: sliding windows and KV quantization are ignored: every layer attends to all context.
    """

    architecture: str
    dtype: str
    bytes_per_param: float
    num_layers: int
    num_moe_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    tied_embeddings: bool
    embedding_params: int
    lm_head_params: int  # V x H even when tied: the logits read the whole matrix
    attention_params: int
    norm_params: int
    dense_mlp_params: int
    router_params: int
    shared_expert_params: int
    expert_params: int
    kv_bytes_per_token: int

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "bfloat16") -> ModelCost:
        """From a Hugging Face model directory (or its config.json file)."""
        p = Path(path).expanduser()
        fix = "pass a Hugging Face model directory (with config.json)"
        if not p.exists():
            raise ValueError(f"--model {path} does not exist; {fix}.")
        file = p / "config.json" if p.is_dir() else p
        if not file.is_file() or file.suffix != ".json":
            raise ValueError(f"--model {path} has no config.json; {fix}.")
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file} is not readable JSON ({exc}); {fix}.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file} is not a config object; {fix}.")
        return cls.from_config(data, dtype, source=str(file))

    @classmethod
    def from_config(cls, config: Any, dtype: str = "bfloat16", source: str = "") -> ModelCost:
        """From a config.json dict or a transformers PretrainedConfig (Llama, Qwen2/3, Qwen3-MoE,
        Mixtral; other Llama-shaped causal LMs with the same field names)."""
        where = source or "the model config"
        archs = list(_get(config, "architectures", default=[]))
        if archs and not any(a.endswith("ForCausalLM") for a in archs):
            raise ValueError(
                f"{where} is for {', '.join(archs)}, not a causal LM; pass a decoder-only "
                "*ForCausalLM model such as Llama, Qwen3 or Qwen3-MoE."
            )
        need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if missing := [n for n in need if _get(config, n) is None]:
            raise ValueError(
                f"{where} has no {', '.join(missing)}: not a decoder-only causal LM config; pass "
                "a Hugging Face Llama / Qwen / Mixtral-style model directory."
            )
        if _get(config, "kv_lora_rank"):
            raise ValueError(f"{where} uses multi-head latent attention, not modelled here yet.")
        dtype = parse_weight_dtype(dtype)
        h, layers, hq, v = (int(_get(config, n)) for n in need)
        hkv = int(_get(config, "num_key_value_heads", default=hq))
        d = int(_get(config, "head_dim") or h // hq)
        model_type = str(_get(config, "model_type", default=""))
        e = int(_get(config, "num_experts", "num_local_experts", "n_routed_experts", default=0))
        k = int(_get(config, "num_experts_per_tok", default=0))
        if e and not 1 <= k <= e:
            raise ValueError(f"{where}: num_experts_per_tok={k} must be in 1..{e}")
        inner = int(_get(config, "intermediate_size", default=0))
        # Mixtral's experts are intermediate_size wide (it has no dense MLP)
        moe_name = "intermediate_size" if model_type == "mixtral" else "moe_intermediate_size"
        moe_inner = int(_get(config, moe_name) or inner or 0)

        # Attention: q [H, Hq D], k and v [H, Hkv D], o [Hq D, H]; Qwen2 always biases q/k/v,
        # `attention_bias` biases q/k/v and (Llama, Qwen3; not GLM-4-MoE) o; Qwen3 adds an
        # RMSNorm [D] on q and on k.
        qwen2 = model_type in ("qwen2", "qwen2_moe")
        bias = bool(_get(config, "attention_bias", default=False))
        o_bias = bias and model_type not in ("qwen2", "qwen2_moe", "glm4_moe")
        attn = 2 * h * hq * d + 2 * h * hkv * d
        attn += (qwen2 or bias) * (hq + 2 * hkv) * d + o_bias * h
        attn += (model_type in ("qwen3", "qwen3_moe") or bool(_get(config, "use_qk_norm"))) * 2 * d

        # MoE layers: every `decoder_sparse_step`-th, minus `mlp_only_layers` (Qwen) and the first
        # `first_k_dense_replace` (DeepSeek-style); dense MLP elsewhere.
        step = int(_get(config, "decoder_sparse_step", default=1) or 1)
        freq = int(_get(config, "moe_layer_freq", default=1) or 1)
        first_dense = int(_get(config, "first_k_dense_replace", default=0))
        mlp_only = set(_get(config, "mlp_only_layers", default=[]))
        moe = e and sum(
            i not in mlp_only and i >= first_dense and (i + 1) % step == 0 and i % freq == 0
            for i in range(layers)
        )
        if layers > moe and not inner:
            raise ValueError(f"{where} has dense MLP layers but no intermediate_size.")
        mlp = 3 * h * inner + bool(_get(config, "mlp_bias")) * (2 * inner + h)
        shared_inner = int(_get(config, "shared_expert_intermediate_size", default=0))
        n_shared = int(_get(config, "n_shared_experts", default=0))
        shared = 3 * h * (shared_inner + n_shared * moe_inner) + (shared_inner > 0) * h  # + gate

        tied = bool(_get(config, "tie_word_embeddings", default=False))
        return cls(
            next((a for a in archs if a.endswith("ForCausalLM")), model_type or "unknown"),
            dtype, DTYPE_BYTES[dtype],
            layers, moe, h, v, hq, hkv, d, e if moe else 0, k if moe else 0, tied,
            embedding_params=v * h, lm_head_params=v * h, attention_params=layers * attn,
            norm_params=(2 * layers + 1) * h, dense_mlp_params=(layers - moe) * mlp,
            router_params=moe * h * e, shared_expert_params=moe * shared,
            expert_params=3 * h * moe_inner if moe else 0,
            # K and V [Hkv, D] per layer, in the activation dtype (bf16 unless the weights are fp32)
            kv_bytes_per_token=2 * layers * hkv * d * (4 if dtype == "float32" else 2),
        )  # fmt: skip

    # ---- sizes ----
    @property
    def total_params(self) -> int:
        """Stored parameters (a tied lm_head counted once)."""
        experts = self.num_moe_layers * self.num_experts * self.expert_params
        head = 0 if self.tied_embeddings else self.lm_head_params
        return self.embedding_params + head + self._layer_dense_params + experts

    @property
    def active_params(self) -> int:
        """Parameters one token runs through, embedding and lm_head excluded: dense + K experts."""
        return self._layer_dense_params + self.num_moe_layers * self.top_k * self.expert_params

    @property
    def _layer_dense_params(self) -> int:
        return (
            self.attention_params
            + self.norm_params
            + self.dense_mlp_params
            + self.router_params
            + self.shared_expert_params
        )

    @property
    def dense_bytes(self) -> float:
        """Bytes every step reads whatever the routing: dense layer weights + the lm_head."""
        return (self._layer_dense_params + self.lm_head_params) * self.bytes_per_param

    @property
    def expert_bytes(self) -> float:
        """Bytes of one routed expert (gate, up, down: 3 x H x I)."""
        return self.expert_params * self.bytes_per_param

    @property
    def weight_bytes(self) -> float:
        return self.total_params * self.bytes_per_param

    # ---- bounds ----
    def expected_experts(self, tokens: int) -> float:
        """Expected distinct experts a MoE layer runs for `tokens` tokens: E (1 - (1 - K/E)^T).

        Each token picks K of E experts uniformly and independently: T = 1 gives K, large T
        tends to E. NOTE: real routers are skewed and touch fewer; this is the uniform case.
        """
        if not self.num_experts or tokens <= 0:
            return 0.0
        return self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** tokens)

    def decode_bytes_per_step(self, batch: int, context_len: int) -> float:
        """Bytes one decode step of `batch` sequences reads, each with `context_len` KV tokens:

        dense_bytes (dense weights + lm_head, once) + moe_layers x expected_experts(batch) x
        expert_bytes + batch x context_len x kv_bytes_per_token. The embedding rows are left out.
        """
        experts = self.num_moe_layers * self.expected_experts(batch) * self.expert_bytes
        return self.dense_bytes + experts + batch * context_len * self.kv_bytes_per_token

    def decode_bound_tokens_per_s(
        self, batch: int, context_len: int, bandwidth_gbps: float
    ) -> float:
        """Memory-bound decode tokens/s: batch x bandwidth / decode_bytes_per_step."""
        return batch * bandwidth_gbps * 1e9 / self.decode_bytes_per_step(batch, context_len)

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs of a T-token prefill: 2 x active_params x T (norms and biases counted like
        weights, a rounding error) + per layer causal attention 4 x T^2/2 x D x Hq (QK^T and PV,
        half the square) + the lm_head for the last token only, 2 x H x V."""
        attention = self.num_layers * 4 * tokens**2 / 2 * self.head_dim * self.num_heads
        return 2 * self.active_params * tokens + attention + 2 * self.lm_head_params

    def prefill_expert_bytes(self, tokens: int) -> float:
        """Routed-expert bytes a T-token prefill reads: moe_layers x expected_experts(T) x
        expert_bytes (each touched expert once)."""
        return self.num_moe_layers * self.expected_experts(tokens) * self.expert_bytes

    def prefill_bound_tokens_per_s(self, tokens: int, tflops: float, hbm_gbps: float) -> float:
        """T / max(prefill_flops / rate, (prefill_expert_bytes + dense_bytes) / bandwidth)."""
        compute = self.prefill_flops(tokens) / (tflops * 1e12)
        memory = (self.prefill_expert_bytes(tokens) + self.dense_bytes) / (hbm_gbps * 1e9)
        return tokens / max(compute, memory)

    def to_dict(self) -> dict[str, Any]:
        derived = ("total_params", "active_params", "weight_bytes", "dense_bytes", "expert_bytes")
        return {**dataclasses.asdict(self), **{n: getattr(self, n) for n in derived}}


# ---- CLI ----------------------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
    """A size such as 1073741824, 512MiB, 1GiB or 2G (binary units) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1GiB or 512MiB")
    scale = 2 ** (10 * " KMGT".index(match[2].upper() or " "))
    return int(float(match[1]) * scale)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument("--model", help="A Hugging Face model directory: also print its bounds.")
    parser.add_argument(
        "--dtype", default="bfloat16", help=f"Weight format: {', '.join(DTYPE_BYTES)}."
    )
    parser.add_argument(
        "--dram-bytes",
        type=parse_bytes,
        default=None,
        help="DRAM test buffer, e.g. 4GiB (default: 1 GiB or 2x the L3, the larger).",
    )
    parser.add_argument("--no-gpu", action="store_true", help="Skip the GPU measurements.")
    parser.add_argument("--batch", type=int, default=1, help="Decode batch for the bounds.")
    parser.add_argument("--context-len", type=int, default=512, help="KV tokens per sequence.")
    parser.add_argument("--prompt-len", type=int, default=512, help="Tokens of one prefill.")


def _fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "none" if value is None else f"{value:,.{digits}f} {unit}"


def model_bounds(
    cost: ModelCost,
    report: PlatformReport,
    batch: int = 1,
    context_len: int = 512,
    prompt_len: int = 512,
) -> dict[str, Any]:
    """`cost.to_dict()` plus its decode and prefill bounds on `report`'s machine: GPU from HBM and
    GPU bf16, CPU from DRAM and CPU bf16 (None where a figure is missing)."""
    hbm, gpu_tflops = report.hbm_gbps, report.bf16_tflops
    dram, cpu_tflops = report.dram_read_gbps, report.cpu_bf16_tflops
    decode = lambda gbps: cost.decode_bound_tokens_per_s(batch, context_len, gbps) if gbps else None
    prefill = lambda tflops, gbps: (
        cost.prefill_bound_tokens_per_s(prompt_len, tflops, gbps) if tflops and gbps else None
    )
    return {
        **cost.to_dict(), "batch": batch, "context_len": context_len, "prompt_len": prompt_len,
        "decode_bytes_per_step": cost.decode_bytes_per_step(batch, context_len),
        "decode_bound_tok_s_gpu": decode(hbm), "decode_bound_tok_s_cpu": decode(dram),
        "prefill_flops": cost.prefill_flops(prompt_len),
        "prefill_bytes": cost.prefill_expert_bytes(prompt_len) + cost.dense_bytes,
        "prefill_bound_tok_s_gpu": prefill(gpu_tflops, hbm),
        "prefill_bound_tok_s_cpu": prefill(cpu_tflops, dram),
    }  # fmt: skip


def format_table(report: PlatformReport, model: dict | None = None) -> str:
    """The human-readable report: one `label  value` row per figure."""
    r = report
    gpu = (
        "none"
        if r.gpu_name is None
        else f"{r.gpu_name} x{r.gpu_count}, {r.gpu_memory_gib:.1f} GiB, {r.gpu_sms} SMs"
    )
    rows = [
        ("CPU", r.cpu_model),
        ("CPU flags", "  ".join(f"{k} {'yes' if v else 'no'}" for k, v in r.cpu_flags.items())),
        ("cores", f"{r.physical_cores} physical, {r.logical_cpus} logical, {r.usable_cpus} usable"),
        ("NUMA", f"{r.numa_nodes} ({', '.join(f'{k}: {v}' for k, v in r.numa_cpus.items())})"),
        ("DRAM", f"{r.dram_total_gib:.1f} GiB"),
        ("DRAM read", f"{_fmt(r.dram_read_gbps, 'GB/s')} ({r.dram_method}, "
                      f"{r.dram_bytes / GiB:.2f} GiB buffer)"),
        ("CPU bf16 matmul", _fmt(r.cpu_bf16_tflops, "TFLOP/s", 2)),
        ("GPU", gpu),
        ("HBM (d2d copy)", _fmt(r.hbm_gbps, "GB/s")),
        ("GPU bf16 matmul", _fmt(r.bf16_tflops, "TFLOP/s")),
        ("PCIe H2D pinned", _fmt(r.h2d_gbps, "GB/s")),
        ("PCIe D2H pinned", _fmt(r.d2h_gbps, "GB/s")),
    ]  # fmt: skip
    rows += [("GPU error", e) for e in r.errors]
    if model is not None:
        m = model
        at = f"batch {m['batch']}, context {m['context_len']}"
        rows += [
            ("model", f"{m['path']} ({m['architecture']}, {m['dtype']})"),
            ("params", f"{m['total_params'] / 1e9:.3f} B, {m['active_params'] / 1e9:.3f} B active "
                       f"a token (no embedding / lm_head)"),
            ("weights", f"{m['weight_bytes'] / 1e9:.2f} GB, KV {m['kv_bytes_per_token']} B/token"),
            ("decode bytes/step", f"{m['decode_bytes_per_step'] / 1e9:.3f} GB ({at})"),
            ("decode bound GPU", _fmt(m["decode_bound_tok_s_gpu"], "tok/s") + " (HBM)"),
            ("decode bound CPU", _fmt(m["decode_bound_tok_s_cpu"], "tok/s") + " (DRAM)"),
            ("prefill bound GPU", _fmt(m["prefill_bound_tok_s_gpu"], "tok/s")
                                  + f" ({m['prompt_len']}-token prompt)"),
            ("prefill bound CPU", _fmt(m["prefill_bound_tok_s_cpu"], "tok/s")),
        ]  # fmt: skip
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def run(args: argparse.Namespace) -> int:
    """`twinfer check`: print the platform (and model bound) table, or JSON with --json."""
    try:
        for name in ("batch", "prompt_len"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if args.context_len < 0:
            raise ValueError("--context-len must be >= 0")
        parse_weight_dtype(args.dtype)
        cost = ModelCost.from_pretrained(args.model, args.dtype) if args.model else None
        report = measure_platform(args.dram_bytes, gpu=not args.no_gpu)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = None
    if cost is not None:
        model = {"path": args.model}
        model |= model_bounds(cost, report, args.batch, args.context_len, args.prompt_len)
    if args.json:
        print(json.dumps({"platform": report.to_dict(), "model": model}, indent=2))
    else:
        print(format_table(report, model))
    return 0
