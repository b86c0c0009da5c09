"""The native CPU expert engine (twinfer.native._engine) against a float64 torch reference.

Shapes: T tokens, H hidden, E experts, K top-k, I expert inner size.
The reference runs on the values the kernels compute with (`pack_unpack`: bf16-rounded or
dequantized int8/int4/int4z/fp8 weights), so the tolerance measures the engine, not the format.
Checkpoint grids (fp8 e4m3fn bytes with per-row-per-group scales, int4z values with scales and
offsets) are compared with torch's own dequantization of them.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from twinfer.native import native_engine, native_error

pytestmark = pytest.mark.skipif(native_engine is None, reason=native_error or "no native engine")
_E = native_engine
_TORCH = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_CPUS = sorted(os.sched_getaffinity(0))


def _pool(threads: int, nodes: list[int] | None = None, pinned: bool = True):
    cpus = [[_CPUS[w % len(_CPUS)]] if pinned else [] for w in range(threads)]
    return _E.ThreadPool(cpus, nodes if nodes is not None else [0] * threads, spin_us=50)


class Experts:
    """Random expert weights, their effective (packed-then-unpacked) values, and a layer.

    `grid`: a checkpoint's weights on the format's grid with their per-row-per-group scales
    (`scales` = (w13 [E, 2I, H/g], w2 [E, H, I/g])) and, int4z, offsets: fp8 e4m3fn bytes, int4z
    float q * s + m; the effective values are then torch's dequantization."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        inner: int,
        fmt: str,
        group: int = 32,
        src: str = "bf16",
        seed: int = 0,
        grid: bool = False,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.E, self.H, self.I = num_experts, hidden, inner
        self.fmt, self.group, self.src = fmt, group, src
        self.scales = self.offsets = None
        if grid:
            self._make_grid(g)
            return
        # w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], in the source dtype.
        w13 = torch.randn(num_experts, 2 * inner, hidden, generator=g) / hidden**0.5
        w2 = torch.randn(num_experts, hidden, inner, generator=g) / inner**0.5
        self.w13, self.w2 = w13.to(_TORCH[src]), w2.to(_TORCH[src])
        self.w13_eff, self.w2_eff = torch.empty_like(w13), torch.empty_like(w2)
        for e in range(num_experts):
            for w, eff in ((self.w13[e], self.w13_eff[e]), (self.w2[e], self.w2_eff[e])):
                rows, cols = w.shape
                _E.pack_unpack(fmt, rows, cols, group, w.data_ptr(), src, eff.data_ptr())

    def _make_grid(self, g: torch.Generator) -> None:
        e, h, i, gs = self.E, self.H, self.I, self.group
        ws, effs, scales, offsets = [], [], [], []
        for rows, cols in ((2 * i, h), (h, i)):
            s = (torch.rand(e, rows, cols // gs, generator=g) + 0.5) / cols**0.5
            if self.fmt == "fp8":  # |v| <= 448: e4m3fn values times s / 64
                s = s / 64
                w = (torch.randn(e, rows, cols, generator=g) * 64).clamp(-448, 448)
                w = w.to(torch.float8_e4m3fn)
                eff = w.float() * s.repeat_interleave(gs, -1)
            else:  # int4z: q * s + m, q in [-8, 7]
                s = s / 4
                m = (torch.rand(e, rows, cols // gs, generator=g) - 0.5) * s
                q = torch.randint(-8, 8, (e, rows, cols), generator=g).float()
                w = eff = q * s.repeat_interleave(gs, -1) + m.repeat_interleave(gs, -1)
                offsets.append(m)
            ws.append(w)
            effs.append(eff)
            scales.append(s)
        self.w13, self.w2 = ws
        self.w13_eff, self.w2_eff = effs
        self.scales = tuple(scales)
        self.offsets = tuple(offsets) if offsets else None
        self.src = "fp8" if self.fmt == "fp8" else "f32"

    def layer(self, pool, loaded=None, bind: bool = True):
        layer = _E.ExpertLayer(pool, self.E, self.H, self.I, self.fmt, self.group, bind)
        experts = list(range(self.E)) if loaded is None else list(loaded)
        if self.scales is not None:  # checkpoint grids: one batch with their scales
            s13, s2 = ([t[e].data_ptr() for e in experts] for t in self.scales)
            m13, m2 = [], []
            if self.offsets is not None:
                m13, m2 = ([t[e].data_ptr() for e in experts] for t in self.offsets)
            w13 = [self.w13[e].data_ptr() for e in experts]
            w2 = [self.w2[e].data_ptr() for e in experts]
            layer.load_experts(experts, w13, w2, self.src, s13, s2, m13, m2)
            return layer
        # The first expert one by one, the rest in one batch (packed on all workers at once).
        for e in experts[:1]:
            layer.load_expert(e, self.w13[e].data_ptr(), self.w2[e].data_ptr(), self.src)
        rest = experts[1:]
        w13, w2 = [self.w13[e].data_ptr() for e in rest], [self.w2[e].data_ptr() for e in rest]
        layer.load_experts(rest, w13, w2, self.src)
        return layer

    def reference(self, x, ids, weights, loaded=None) -> torch.Tensor:
        """out [T, H] float64: sum over k of weight * down(silu(gate x) * up x)."""
        inner = self.I
        out = torch.zeros(x.shape[0], self.H, dtype=torch.float64)
        for e in ids.unique().tolist():
            if loaded is not None and e not in loaded:
                continue
            t, k = (ids == e).nonzero(as_tuple=True)
            xe = x[t].double()
            w13, w2 = self.w13_eff[e].double(), self.w2_eff[e].double()
            act = torch.nn.functional.silu(xe @ w13[:inner].T) * (xe @ w13[inner:].T)
            out.index_add_(0, t, weights[t, k].double()[:, None] * (act @ w2.T))
        return out


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _routing(T: int, E: int, K: int, seed: int = 1, ids_dtype=torch.int64, w_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(T, E, generator=g)
    w, ids = scores.softmax(-1).topk(K, dim=-1)
    return ids.to(ids_dtype).contiguous(), w.to(w_dtype).contiguous()


def _forward(eng, lid, x, ids, w, out=None) -> torch.Tensor:
    out = torch.empty_like(x) if out is None else out
    dt = {torch.int32: "int32", torch.int64: "int64"}
    name = {v: k for k, v in _TORCH.items()}
    eng.forward(
        lid,
        x.data_ptr(),
        name[x.dtype],
        ids.data_ptr(),
        dt[ids.dtype],
        w.data_ptr(),
        name[w.dtype],
        out.data_ptr(),
        x.shape[0],
        ids.shape[1],
    )
    return out


def _engine(pool, layer):
    eng = _E.MoEEngine(pool)
    return eng, eng.add_layer(layer)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    # NOTE: against the reference rounded to out's dtype: a bf16 output is 2^-9 off by its own
    # rounding, which is not the engine's error.
    ref_r = ref.to(out.dtype).double()
    return ((out.double() - ref_r).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "f32", "f16", "int4z", "fp8"])
@pytest.mark.parametrize(("T", "K"), [(1, 1), (2, 8), (5, 2), (8, 8), (33, 8), (64, 2)])
def test_forward_matches_reference(fmt: str, T: int, K: int) -> None:
    ex = Experts(16, 128, 64, fmt)
    pool = _pool(len(_CPUS))
    eng, lid = _engine(pool, ex.layer(pool))
    x = _randn(T, 128, seed=T)
    ids, w = _routing(T, 16, K)
    assert _rel_err(_forward(eng, lid, x, ids, w), ex.reference(x, ids, w)) < 1e-3


@pytest.mark.parametrize(("fmt", "group"), [("fp8", 32), ("fp8", 128), ("int4z", 64)])
@pytest.mark.parametrize(("T", "K"), [(1, 2), (9, 4), (33, 8)])
def test_forward_checkpoint_grid(fmt: str, group: int, T: int, K: int) -> None:
    """fp8 e4m3fn bytes with their scales, int4z with scales and offsets: packed as they are,
    the layer computes with torch's dequantization of them (two simulated nodes)."""
    ex = Experts(8, 256, 128, fmt, group=group, grid=True)
    n = min(2, len(_CPUS))
    pool = _pool(n, nodes=list(range(n)))
    eng, lid = _engine(pool, ex.layer(pool, bind=False))
    x = _randn(T, 256, seed=T).bfloat16()
    ids, w = _routing(T, 8, K)
    assert _rel_err(_forward(eng, lid, x, ids, w), ex.reference(x, ids, w)) < 1e-3


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("fmt", ["fp8", "int4z"])
def test_cpu_expert_engine_grid_layer(fmt: str, native: bool, monkeypatch) -> None:
    """CpuExpertEngine.add_layer with a checkpoint grid (fp8 tensors + scales, int4z values +
    scales + offsets), on the native engine and on the torch fallback (float copies)."""
    from twinfer.hybrid import cpu_experts
    from twinfer.hybrid.numa import WorkerPlan

    if not native:
        monkeypatch.setattr(cpu_experts, "native_engine", None)
    workers = WorkerPlan([[c] for c in _CPUS], [0] * len(_CPUS))
    engine = cpu_experts.CpuExpertEngine(workers, spin_us=20, max_tokens=64)
    assert engine.native == native
    ex = Experts(8, 256, 128, fmt, group=128, grid=True)
    host = engine.add_layer(ex.w13, ex.w2, fmt, 128, ex.scales, ex.offsets)
    x = _randn(9, 256)
    ids, w = _routing(9, 8, 2)
    assert _rel_err(host.forward(x, w, ids), ex.reference(x, ids, w)) < 1e-5
    w13_fp8, w2_fp8 = ex.w13.to(torch.float8_e4m3fn), ex.w2.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fp8 expert weights need their group scales"):
        engine.add_layer(w13_fp8, w2_fp8, "fp8", 128)
    with pytest.raises(ValueError, match="group offsets need the int4z format"):
        engine.add_layer(ex.w13, ex.w2, "int4", 128, ex.scales, ex.scales)
    if native:
        bad = (ex.scales[0][:, :, :1], ex.scales[1])
        with pytest.raises(ValueError, match=r"w13 group scales must be \[8, 256, 2\]"):
            engine.add_layer(ex.w13, ex.w2, fmt, 128, bad, ex.offsets)


@pytest.mark.parametrize("hidden_dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_dtypes(hidden_dtype: str, ids_dtype, w_dtype) -> None:
    ex = Experts(8, 64, 32, "bf16")
    pool = _pool(len(_CPUS))
    eng, lid = _engine(pool, ex.layer(pool))
    x = _randn(8, 64).to(_TORCH[hidden_dtype])
    ids, w = _routing(8, 8, 2, ids_dtype=ids_dtype, w_dtype=w_dtype)
    out = _forward(eng, lid, x, ids, w)
    assert out.dtype == x.dtype
    assert _rel_err(out, ex.reference(x, ids, w)) < 1e-3


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_bits_do_not_depend_on_threads_or_pinning(fmt: str) -> None:
    ex = Experts(8, 96, 64, fmt)
    xs = {T: _randn(T, 96, seed=T).bfloat16() for T in (1, 2, 5, 8, 33, 64)}
    results = []
    for threads in range(1, len(_CPUS) + 2):  # one more than the cores: barriers must yield
        for pinned in (True, False):
            pool = _pool(threads, pinned=pinned)
            eng, lid = _engine(pool, ex.layer(pool))
            outs = {}
            for T, x in xs.items():
                ids, w = _routing(T, 8, 2 if T > 8 else 8, seed=T)
                outs[T] = _forward(eng, lid, x, ids, w)
            results.append(outs)
    for outs in results[1:]:
        for T in xs:
            assert torch.equal(outs[T], results[0][T]), T


def test_simulated_two_nodes_shard_plan_and_bits() -> None:
    ex = Experts(4, 96, 64, "int8")
    one = _pool(2)
    two = _pool(2, nodes=[0, 1])
    plan = ex.layer(two, bind=False).shard_plan()
    assert [(p["node"], p["threads"]) for p in plan] == [(0, 1), (1, 1)]
    assert [(p["inner_begin"], p["inner_end"]) for p in plan] == [(0, 32), (32, 64)]
    assert [(p["hidden_begin"], p["hidden_end"]) for p in plan] == [(0, 48), (48, 96)]
    x = _randn(33, 96)
    ids, w = _routing(33, 4, 2)
    out_one = _forward(*_engine(one, ex.layer(one)), x, ids, w)
    out_two = _forward(*_engine(two, ex.layer(two, bind=False)), x, ids, w)
    assert torch.equal(out_one, out_two)
    assert _rel_err(out_two, ex.reference(x, ids, w)) < 1e-3


def test_shard_plan_proportional_to_workers() -> None:
    # Node 0 has two workers, node 5 one: I = 96 -> 6 units of 16 split 4:2; H = 72 -> 4 units
    # of 16 split 3:1 (rounded), the last node takes the 8 left over.
    pool = _pool(3, nodes=[5, 0, 0], pinned=False)
    plan = _E.ExpertLayer(pool, 2, 72, 96, "bf16", 128, False).shard_plan()
    assert [(p["node"], p["threads"]) for p in plan] == [(0, 2), (5, 1)]
    assert [(p["inner_begin"], p["inner_end"]) for p in plan] == [(0, 64), (64, 96)]
    assert [(p["hidden_begin"], p["hidden_end"]) for p in plan] == [(0, 48), (48, 72)]
    # Too small for 16 per node: units of 1, every node still gets some.
    plan = _E.ExpertLayer(pool, 2, 20, 3, "f32", 0, False).shard_plan()
    assert [(p["inner_begin"], p["inner_end"]) for p in plan] == [(0, 2), (2, 3)]


def test_layer_holding_some_experts() -> None:
    ex = Experts(16, 64, 32, "bf16")
    loaded = [1, 3, 4, 9]
    pool = _pool(len(_CPUS))
    layer = ex.layer(pool, loaded=loaded)
    assert layer.loaded == loaded
    assert layer.bytes == 4 * (
        2 * _E.packed_bytes("bf16", 32, 64, 0) + _E.packed_bytes("bf16", 64, 32, 0)
    )
    eng, lid = _engine(pool, layer)
    x = _randn(5, 64)
    ids = torch.tensor([[1, 2], [0, 2], [9, 3], [15, 4], [4, 1]])  # token 1: no expert here
    w = _randn(5, 2, seed=1).abs()
    out = _forward(eng, lid, x, ids, w)
    assert torch.equal(out[1], torch.zeros(64))
    assert _rel_err(out, ex.reference(x, ids, w, loaded=loaded)) < 1e-3


def test_submit_wait_and_num_tokens_cap() -> None:
    ex = Experts(8, 64, 32, "int4")
    pool = _pool(len(_CPUS))
    eng, lid = _engine(pool, ex.layer(pool))
    T = 16
    x = _randn(T, 64).bfloat16()
    ids, w = _routing(T, 8, 2)
    want = _forward(eng, lid, x, ids, w)
    out = torch.full((T, 64), 7.0, dtype=torch.bfloat16)
    eng.bind_buffers(
        x.data_ptr(), "bf16", ids.data_ptr(), "int64", w.data_ptr(), "f32", out.data_ptr(), T, 2
    )
    eng.submit(lid, T)
    eng.wait()
    assert torch.equal(out, want)
    # Rows at and past num_tokens are left untouched (graph replays pad with rows nobody reads).
    # NOTE: compared with a forward of as many tokens: the kernel path may depend on the number
    # of tokens per expert, so the bits of 5 rows of a 16-token step may differ in the last place.
    for cap, n in ((5, 9), (T, 3)):
        out.fill_(7.0)
        eng.set_num_tokens(cap)
        eng.submit(lid, n)  # computes min(cap, n) rows
        eng.wait()
        m = min(cap, n)
        assert torch.equal(out[:m], _forward(eng, lid, x[:m], ids[:m], w[:m]))
        assert (out[m:] == 7.0).all()
    stats = eng.stats()
    assert stats["steps"] == 6 and len(stats["phase_ns"]) == 3 and stats["kernel_ns"] > 0
    assert 0 < sum(stats["phase_ns"]) <= stats["busy_ns"]


def test_bad_input() -> None:
    ex = Experts(4, 64, 32, "bf16")
    pool = _pool(1)
    eng, lid = _engine(pool, ex.layer(pool))
    x, out = _randn(2, 64), torch.empty(2, 64)
    ids, w = torch.tensor([[0, 4], [1, 2]]), torch.ones(2, 2)
    args = [x.data_ptr(), "f32", ids.data_ptr(), "int64", w.data_ptr(), "f32", out.data_ptr()]
    with pytest.raises(ValueError, match=r"expert id 4 at token 0, k 1 is outside \[0, 4\)"):
        eng.forward(lid, *args, 2, 2)
    with pytest.raises(ValueError, match="dtype"):
        eng.forward(lid, x.data_ptr(), "float8", *args[2:], 2, 2)
    with pytest.raises(ValueError, match="hidden dtype must be"):  # out follows hidden's dtype
        eng.forward(lid, x.data_ptr(), "int32", *args[2:], 2, 2)
    with pytest.raises(ValueError, match="ids dtype"):
        eng.forward(lid, *args[:3], "f32", *args[4:], 2, 2)
    with pytest.raises(ValueError, match="pointer is 0"):
        eng.forward(lid, 0, *args[1:], 2, 2)
    with pytest.raises(ValueError, match="layer id 3"):
        eng.forward(3, *args, 2, 2)
    with pytest.raises(ValueError, match="not one of f32, bf16"):
        _E.ExpertLayer(pool, 4, 64, 32, "int3")
    with pytest.raises(ValueError):
        _E.ExpertLayer(pool, 4, 64, 32, "int4", 48)  # group size must divide into 32/64/128
    with pytest.raises(ValueError, match="outside"):
        ex.layer(pool, loaded=[]).load_expert(4, 1, 1, "f32")
    with pytest.raises(ValueError, match="may not use"):
        _E.ThreadPool([[100000]], [0])
    eng.bind_buffers(*args, 2, 2)
    with pytest.raises(ValueError, match="bound buffers"):
        eng.set_num_tokens(3)
    with pytest.raises(ValueError, match="bound buffers"):
        eng.submit(lid, 3)
    # The async path records bad ids (the slot is dropped) and wait() raises.
    eng.submit(lid, 2)
    with pytest.raises(RuntimeError, match="expert id 4"):
        eng.wait()
    assert eng.last_error() == ""
    ids[0, 1] = 3
    eng.submit(lid, 2)
    eng.wait()


def test_grid_formats_bad_input() -> None:
    pool = _pool(1)
    with pytest.raises(ValueError, match="fp8 group_size 48 is not supported"):
        _E.ExpertLayer(pool, 4, 64, 32, "fp8", 48)
    with pytest.raises(ValueError, match="int4z needs cols divisible by group_size"):
        _E.ExpertLayer(pool, 4, 96, 32, "int4z", 64)
    ex = Experts(2, 64, 32, "fp8", group=32, grid=True)
    w13, w2 = [ex.w13[0].data_ptr()], [ex.w2[0].data_ptr()]
    s13, s2 = [ex.scales[0][0].data_ptr()], [ex.scales[1][0].data_ptr()]
    fp8 = _E.ExpertLayer(pool, 2, 64, 32, "fp8", 32)
    with pytest.raises(ValueError, match="fp8 weights need their group scales"):
        fp8.load_experts([0], w13, w2, "fp8")
    with pytest.raises(ValueError, match="fp8 weights need their group scales"):
        fp8.load_expert(0, w13[0], w2[0], "torch.float8_e4m3fn")
    with pytest.raises(ValueError, match="group offsets need an int4z layer"):
        fp8.load_experts([0], w13, w2, "fp8", s13, s2, s13, s2)
    with pytest.raises(ValueError, match="load only into an fp8 layer"):
        _E.ExpertLayer(pool, 2, 64, 32, "int4", 32).load_experts([0], w13, w2, "fp8", s13, s2)
    with pytest.raises(ValueError, match="group scales need an int4, int4z or fp8 layer"):
        _E.ExpertLayer(pool, 2, 64, 32, "bf16", 32).load_experts([0], w13, w2, "f32", s13, s2)
    with pytest.raises(ValueError, match="group offsets need an int4z layer.*group scales"):
        _E.ExpertLayer(pool, 2, 64, 32, "int4z", 32).load_experts(
            [0], w13, w2, "f32", [], [], s13, s2
        )
    fp8.load_experts([0], w13, w2, "fp8", s13, s2)
    assert fp8.loaded == [0] and fp8.format == "fp8" and fp8.group_size == 32


def test_stream_signal_listener() -> None:
    """The listener answers what a stream's memory operations would write: a ready word
    (tokens << 12 | layer + 1) starts the step, the answer word gets the same code when it is
    done, and the ready word is cleared. Here Python plays the stream."""
    ex = Experts(8, 64, 32, "bf16")
    pool = _pool(len(_CPUS))
    eng, lid = _engine(pool, ex.layer(pool))
    T = 3
    x = _randn(T, 64).bfloat16()
    ids, w = _routing(T, 8, 2, ids_dtype=torch.int32)
    want = _forward(eng, lid, x, ids, w)
    out = torch.zeros(T, 64, dtype=torch.bfloat16)
    eng.bind_buffers(
        x.data_ptr(), "bf16", ids.data_ptr(), "int32", w.data_ptr(), "f32", out.data_ptr(), T, 2
    )
    words = torch.zeros(32, dtype=torch.int32)  # [0] ready, [16] answered: two cache lines
    eng.bind_signals(words[0:].data_ptr(), words[16:].data_ptr(), 100)
    for rows in (T, 1):
        code = (rows << 12) | (lid + 1)
        words[16] = 0  # the stream clears the answer after each wait
        words[0] = code
        deadline = time.monotonic() + 10
        while int(words[16]) != code and time.monotonic() < deadline:
            time.sleep(1e-4)
        assert int(words[16]) == code and int(words[0]) == 0
        assert torch.equal(out[:rows], _forward(eng, lid, x[:rows], ids[:rows], w[:rows]))
    assert torch.equal(out[1:], want[1:])
    with pytest.raises(ValueError, match="distinct"):
        eng.bind_signals(words.data_ptr(), words.data_ptr(), 0)
    del eng  # joins the listener


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_enqueue_without_cuda() -> None:
    ex = Experts(2, 64, 32, "bf16")
    pool = _pool(1)
    eng, lid = _engine(pool, ex.layer(pool))
    x, out = _randn(1, 64), torch.empty(1, 64)
    ids, w = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    eng.bind_buffers(
        x.data_ptr(), "f32", ids.data_ptr(), "int64", w.data_ptr(), "f32", out.data_ptr(), 1, 1
    )
    with pytest.raises(RuntimeError, match=r"libcuda\.so\.1|cuLaunchHostFunc"):
        eng.enqueue(0, lid, 1)
    with pytest.raises(RuntimeError, match=r"libcuda\.so\.1|cuLaunchHostFunc"):
        eng.enqueue_wait(0)
    with pytest.raises(RuntimeError, match=r"libcuda\.so\.1|cuLaunchHostFunc"):
        eng.enqueue_run(0, lid, 1)
    with pytest.raises(ValueError, match="layer id 7"):
        eng.enqueue_run(0, 7, 1)
    with pytest.raises(ValueError, match="bind_signals first"):
        eng.enqueue_signal(0, lid, 1)


def test_isa_cap(monkeypatch) -> None:
    pool = _pool(1)
    best = _E.cpu_features()["isa"]
    names = _E.isa_names()
    monkeypatch.setenv("TWINFER_CPU_ISA", "nope")
    with pytest.raises(ValueError, match="TWINFER_CPU_ISA=nope"):
        _E.MoEEngine(pool)
    if best != names[-1]:
        monkeypatch.setenv("TWINFER_CPU_ISA", names[-1])
        with pytest.raises(ValueError, match="this CPU runs at most"):
            _E.MoEEngine(pool)
    ex = Experts(4, 64, 32, "int8")
    x = _randn(3, 64)
    ids, w = _routing(3, 4, 2)
    for isa in names[: names.index(best) + 1]:
        monkeypatch.setenv("TWINFER_CPU_ISA", isa)
        eng, lid = _engine(pool, ex.layer(pool))
        assert eng.isa == isa
        assert _rel_err(_forward(eng, lid, x, ids, w), ex.reference(x, ids, w)) < 1e-3


def test_pool_and_bandwidth() -> None:
    pool = _pool(len(_CPUS), nodes=[0] * len(_CPUS))
    assert pool.num_threads == len(_CPUS) and pool.nodes == [0] * len(_CPUS)
    pool.spin_us = 0  # power saving: sleep at once between jobs
    assert pool.spin_us == 0
    assert _E.measure_read_bandwidth(pool, 16 << 20, 2) > 0.1
