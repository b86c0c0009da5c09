"""The native CPU expert kernels (matmul_rows through `_engine.matmul`) against torch references.

Shapes: T tokens, R rows (outputs), C cols (inputs). y [T, R] = x [T, C] @ W^T.
The reference runs on the values the kernels compute with: bf16/f16/f32 weights as given, int8,
int4, int4z and fp8 weights dequantized (`pack_unpack`), in float64 with the same float32
activations. The rule is the issue's: ||y - ref|| / ||ref|| < 1e-3 for every format, on every ISA
this CPU has. G = C / group size (per-row-per-group scales and offsets are f32 [R, G]).
"""

from __future__ import annotations

import pytest
import torch

from twinfer.native import native_engine, native_error

pytestmark = pytest.mark.skipif(native_engine is None, reason=native_error or "no native engine")
_E = native_engine
_TORCH = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_NAMES[torch.float8_e4m3fn] = "fp8"
# (format, group size, source dtype): int8/int4/int4z/fp8 quantize from float32 (the loader's
# usual input) or bf16.
_FORMATS = [
    ("f32", 0, "f32"),
    ("bf16", 0, "bf16"),
    ("f16", 0, "f16"),
    ("int8", 0, "f32"),
    ("int4", 32, "bf16"),
    ("int4", 64, "f32"),
    ("int4", 128, "f32"),
    ("int4z", 32, "bf16"),
    ("int4z", 128, "f32"),
    ("fp8", 32, "bf16"),
    ("fp8", 64, "f32"),
    ("fp8", 128, "f32"),
]
_TOKENS = [1, 2, 3, 7, 8, 16, 33, 64]


def _isas() -> list[str]:
    if _E is None:
        return []
    names = _E.isa_names()
    return names[: names.index(_E.cpu_features()["isa"]) + 1]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _matmul(fmt, group, w, x, isa, split=1, x_bf16=True, scales=None, offsets=None):
    """y [T, R] from the kernels; `scales` / `offsets` [R, G]: the grid the weights are on."""
    y = torch.full((x.shape[0], w.shape[0]), float("nan"))
    rows, cols = w.shape
    _E.matmul(
        fmt, rows, cols, group, w.data_ptr(), _NAMES[w.dtype], x.data_ptr(), x.shape[0],
        y.data_ptr(), isa, split, x_bf16, _ptr(scales), _ptr(offsets),
    )  # fmt: skip
    return y


def _effective(fmt, group, w, scales=None, offsets=None) -> torch.Tensor:
    """The weights as the kernels see them (float32 [R, C])."""
    if fmt in ("f32", "bf16", "f16"):
        return w.float()
    out = torch.empty(w.shape)
    rows, cols = w.shape
    _E.pack_unpack(
        fmt, rows, cols, group, w.data_ptr(), _NAMES[w.dtype], out.data_ptr(), _ptr(scales),
        _ptr(offsets),
    )  # fmt: skip
    return out


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def _shapes(group: int) -> list[tuple[int, int]]:
    """(R, C): odd row counts (not multiples of the 16-row blocks), C = 64 .. 2048."""
    if group:  # grouped formats: C % group == 0
        return [(37, 2048), (19, 3 * group), (5, group if group >= 64 else 64)]
    return [(37, 2048), (19, 192), (5, 64), (21, 72)]  # 72: C not a multiple of 32 either


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize(("fmt", "group", "src"), _FORMATS)
def test_matmul_accuracy_and_split(fmt: str, group: int, src: str, isa: str) -> None:
    g = torch.Generator().manual_seed(sum(map(ord, f"{fmt}{group}{isa}")))
    for rows, cols in _shapes(group):
        w = (torch.randn(rows, cols, generator=g) / cols**0.5).to(_TORCH[src]).contiguous()
        w_ref = _effective(fmt, group, w).double()
        for n in _TOKENS if rows > 16 else [1, 8, 33]:
            x = torch.randn(n, cols, generator=g)
            ref = x.double() @ w_ref.T
            y = _matmul(fmt, group, w, x, isa, x_bf16=n % 2 == 0)
            err = _rel_err(y, ref)
            assert err < 1e-3, f"{fmt}/{group} isa={isa} R={rows} C={cols} T={n}: rel err {err:.2e}"
            # Rows split over 7 calls (cuts not on 16-row blocks) give the same bits.
            y7 = _matmul(fmt, group, w, x, isa, split=7, x_bf16=n % 2 == 0)
            assert torch.equal(y, y7), f"{fmt}/{group} isa={isa} R={rows} T={n}: split changed y"


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", ["fp8", "int4z"])
def test_matmul_grid_sources_accuracy_and_split(fmt: str, isa: str) -> None:
    """Checkpoint grids: fp8 e4m3fn bytes with their scales, int4z float values q * s + m with
    their scales and offsets. The kernels compute with exactly the checkpoint's values."""
    g = torch.Generator().manual_seed(11)
    for group in (32, 128):
        for rows, cols in _shapes(group):
            w, scales, offsets = _grid(fmt, rows, cols, group, g)
            w_ref = _effective(fmt, group, w, scales, offsets)
            assert torch.equal(w_ref, _dequantized(fmt, w, scales, offsets))
            for n in _TOKENS if rows > 16 else [1, 8, 33]:
                x = torch.randn(n, cols, generator=g)
                ref = x.double() @ w_ref.double().T
                y = _matmul(fmt, group, w, x, isa, 1, n % 2 == 0, scales, offsets)
                err = _rel_err(y, ref)
                assert err < 1e-3, f"{fmt}/{group} isa={isa} R={rows} C={cols} T={n}: {err:.2e}"
                y7 = _matmul(fmt, group, w, x, isa, 7, n % 2 == 0, scales, offsets)
                assert torch.equal(y, y7), f"{fmt}/{group} isa={isa} R={rows} T={n}: split"


def _grid(fmt: str, rows: int, cols: int, group: int, g: torch.Generator):
    """A checkpoint's weights on `fmt`'s grid: (w, scales [R, G], offsets [R, G] or None).
    fp8: e4m3fn bytes (every finite value reachable); int4z: float32 (q - 8 + ...) * s + m."""
    scales = torch.rand(rows, cols // group, generator=g) / 100 + 1e-3
    if fmt == "fp8":
        v = torch.randn(rows, cols, generator=g) * 100
        return v.clamp(-448, 448).to(torch.float8_e4m3fn), scales, None
    q = torch.randint(-8, 8, (rows, cols), generator=g).float()
    offsets = (torch.rand(rows, cols // group, generator=g) - 0.5) * 0.1
    w = q * scales.repeat_interleave(group, 1) + offsets.repeat_interleave(group, 1)
    return w, scales, offsets


def _dequantized(fmt: str, w: torch.Tensor, scales, offsets) -> torch.Tensor:
    """torch's own dequantization of a grid (f32 [R, C]): fp8 w.float() * s, int4z w itself."""
    group = w.shape[1] // scales.shape[1]
    if fmt == "fp8":
        return w.float() * scales.repeat_interleave(group, 1)
    return w.float()


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int4z", "fp8"])
def test_matmul_prefill_sized(fmt: str, isa: str) -> None:
    """200 tokens (several AMX token blocks plus a partial one), activations exact in bf16 too."""
    g = torch.Generator().manual_seed(7)
    rows, cols, group = 45, 1024, 128 if fmt in ("int4", "int4z", "fp8") else 0
    w = (torch.randn(rows, cols, generator=g) / cols**0.5).to(torch.bfloat16)
    w_ref = _effective(fmt, group, w).double()
    for x in (
        torch.randn(200, cols, generator=g),
        torch.randn(200, cols, generator=g).bfloat16().float(),
    ):  # lo part all zero
        err = _rel_err(_matmul(fmt, group, w, x, isa, split=3), x.double() @ w_ref.T)
        assert err < 1e-3, f"{fmt} isa={isa} T=200: rel err {err:.2e}"


@pytest.mark.parametrize(
    ("fmt", "group", "qmax"), [("int8", 0, 127), ("int4", 32, 7), ("int4", 64, 7), ("int4", 128, 7)]
)
def test_quantization_round_trip(fmt: str, group: int, qmax: int) -> None:
    g = torch.Generator().manual_seed(3)
    rows, cols = 19, 256
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[3] = 0.0  # an all-zero row (and groups): scale 0, values 0
    deq = _effective(fmt, group, w)
    blocks = w.view(rows, -1, group if group else cols)
    step = (blocks.abs().amax(-1, keepdim=True) / qmax).expand_as(blocks).reshape(rows, cols)
    assert torch.all((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12)
    assert torch.all(deq[3] == 0)
    # The dequantized values are q * scale with integer q in range.
    q = torch.where(step > 0, deq / torch.where(step > 0, step, 1), 0)
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= qmax + 1e-4


def test_zero_rows_give_zero() -> None:
    w = torch.zeros(17, 128)
    x = torch.randn(5, 128)
    for fmt, group in (("int8", 0), ("int4", 32), ("bf16", 0), ("int4z", 32), ("fp8", 64)):
        for isa in _isas():
            assert torch.equal(_matmul(fmt, group, w, x, isa), torch.zeros(5, 17))


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="group_size"):
        _E.packed_bytes("int4", 8, 256, 48)
    with pytest.raises(ValueError, match="divisible"):
        _E.packed_bytes("int4", 8, 96, 64)
    with pytest.raises(ValueError):
        _E.packed_bytes("int4", 8, 0, 32)
    w = torch.randn(4, 96)
    out = torch.empty(4, 96)
    with pytest.raises(ValueError, match="divisible"):
        _E.pack_unpack("int4", 4, 96, 64, w.data_ptr(), "f32", out.data_ptr())


def test_packed_bytes_layout() -> None:
    """Rows pad to 16-row blocks, cols to 32; scales are f32 (INT8 per row, INT4 per group)."""
    assert _E.packed_bytes("bf16", 16, 2048, 0) == 16 * 2048 * 2
    assert _E.packed_bytes("bf16", 17, 2048, 0) == 32 * 2048 * 2
    assert _E.packed_bytes("f32", 1, 40, 0) == 16 * 64 * 4
    assert _E.packed_bytes("int8", 32, 768, 0) == 2 * (16 * 768 + 64)
    assert _E.packed_bytes("int4", 16, 2048, 128) == 16 * (1024 + 2048 // 128 * 4)
    assert _E.packed_bytes("int4", 16, 2048, 32) == 16 * (1024 + 2048 // 32 * 4)
    # int4z: int4 plus an f32 offset per row and group; fp8: a byte per weight, scales per group.
    assert _E.packed_bytes("int4z", 16, 2048, 128) == 16 * (1024 + 2048 // 128 * 8)
    assert _E.packed_bytes("fp8", 17, 2048, 128) == 2 * 16 * (2048 + 2048 // 128 * 4)
    assert _E.packed_bytes("fp8", 16, 256, 32) == 16 * (256 + 256 // 32 * 4)


def test_isa_cap_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """TWINFER_CPU_ISA caps the best ISA (never raises it); an unknown name is ignored here."""
    best = _E.cpu_features()["isa"]
    names = _E.isa_names()
    monkeypatch.setenv("TWINFER_CPU_ISA", "scalar")
    assert _E.cpu_features()["isa"] == "scalar"
    monkeypatch.setenv("TWINFER_CPU_ISA", names[-1])
    assert _E.cpu_features()["isa"] == best
    monkeypatch.setenv("TWINFER_CPU_ISA", "nonsense")
    assert _E.cpu_features()["isa"] == best


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("src", ["f32", "bf16"])
def test_int4_grid_with_its_scales_packs_losslessly(group: int, src: str) -> None:
    """A checkpoint's int4 grid (q in -8..7, its own scale per group) given with those scales
    comes back exactly, also from bf16-rounded weights; the absmax/7 rule cannot (q = -8)."""
    torch.manual_seed(0)
    rows, cols = 19, 256  # a partial 16-row block
    q = torch.randint(-8, 8, (rows, cols)).float()
    q[:, ::group] = -8  # every group holds -8: absmax / 7 would change the grid
    scales = torch.rand(rows, cols // group) / 10 + 0.01
    w = q * scales.repeat_interleave(group, 1)  # [R, C] f32, on the grid
    source = w.to(_TORCH[src])
    out = torch.empty(rows, cols)
    _E.pack_unpack(
        "int4", rows, cols, group, source.data_ptr(), src, out.data_ptr(), scales.data_ptr()
    )
    assert torch.equal(out, w)
    _E.pack_unpack("int4", rows, cols, group, source.data_ptr(), src, out.data_ptr())
    assert not torch.equal(out, w)  # requantized: the same values only by accident


# ---- fp8 (e4m3fn) and int4z (asymmetric int4) -----------------------------------------------


def _all_bytes() -> torch.Tensor:
    """[16, 256] e4m3fn: row r holds every byte, rotated by r (each lane sees every byte)."""
    b = torch.arange(256, dtype=torch.int32)
    return torch.stack([(b + 7 * r) % 256 for r in range(16)]).to(torch.uint8)


def test_fp8_decode_every_byte_exact() -> None:
    """All 256 bytes, as pack_unpack and every ISA's kernel decode them, against torch's
    float8_e4m3fn -> float32 times the scale (the two NaN bytes decode to +-480 x scale)."""
    w = _all_bytes().view(torch.float8_e4m3fn)
    rows, cols = w.shape
    for scales in (torch.ones(rows, cols // 32), torch.rand(rows, cols // 32) * 3 + 1e-3):
        want = w.float() * scales.repeat_interleave(32, 1)
        nan = w.float().isnan()
        assert nan.sum() == 2 * rows
        want[nan] = torch.where(w.view(torch.uint8)[nan] == 0x7F, 480.0, -480.0)
        want[nan] *= scales.repeat_interleave(32, 1)[nan]
        assert torch.equal(_effective("fp8", 32, w, scales), want)
        # One-hot tokens: token t reads column t of every row, one exact product per output.
        x = torch.eye(cols)
        for isa in _isas():
            y = _matmul("fp8", 32, w, x, isa, scales=scales)
            assert torch.equal(y, want.T), isa


@pytest.mark.parametrize("group", [32, 128])
def test_fp8_quantization_matches_torch(group: int) -> None:
    """From float weights: scale = absmax / 448 per row and group, values rounded to nearest
    even e4m3fn: bit for bit what torch's float8_e4m3fn cast gives (an all-zero group: 0)."""
    g = torch.Generator().manual_seed(5)
    rows, cols = 19, 256
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[:, 7] = 1e-30  # tiny values flush to 0 / e4m3 subnormals
    w[3] = 0.0

    def torch_fp8(wf: torch.Tensor) -> torch.Tensor:
        blocks = wf.view(rows, -1, group)
        scale = blocks.abs().amax(-1, keepdim=True) / 448
        q = torch.where(scale > 0, blocks / torch.where(scale > 0, scale, 1), 0)
        return (q.to(torch.float8_e4m3fn).float() * scale).view(rows, cols)

    for src in ("f32", "bf16"):
        source = w.to(_TORCH[src])
        assert torch.equal(_effective("fp8", group, source), torch_fp8(source.float())), src
    # Weights already on an fp8 grid (v * s in float), given their scales: the same values.
    v, s, _ = _grid("fp8", rows, cols, group, g)
    on_grid = _dequantized("fp8", v, s, None)
    assert torch.equal(_effective("fp8", group, on_grid, s), on_grid)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4z_min_max_quantization(group: int) -> None:
    """From float weights without scales: s = (max - min) / 15, m = min + 8 s, q + 8 =
    round((w - min) / s) in [0, 15]; a constant group keeps its value exactly."""
    g = torch.Generator().manual_seed(9)
    rows, cols = 19, 256
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) + 0.3
    w[3] = 0.25  # constant groups: s = 0, W = m = min
    blocks = w.view(rows, -1, group)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    m = lo + 8 * s
    u = torch.where(s > 0, ((blocks - lo) / torch.where(s > 0, s, 1)).round().clamp(0, 15), 8)
    want = ((u - 8) * s + m).view(rows, cols)
    deq = _effective("int4z", group, w)
    assert torch.equal(deq, want)
    assert torch.all(deq[3] == 0.25)
    assert torch.all((deq - w).abs() <= (s / 2).expand_as(blocks).reshape(rows, cols) * 1.0001)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("src", ["f32", "bf16"])
def test_int4z_grid_with_its_scales_and_offsets_packs_losslessly(group: int, src: str) -> None:
    """An asymmetric checkpoint grid (float min style W = q * s + m, and zero-point style W =
    (u - z) * s, i.e. m = (8 - z) * s) comes back exactly, also from bf16-rounded weights."""
    g = torch.Generator().manual_seed(1)
    rows, cols = 19, 256
    w, s, m = _grid("int4z", rows, cols, group, g)
    z = torch.randint(0, 16, s.shape, generator=g).float()
    u = torch.randint(0, 16, (rows, cols), generator=g).float()
    m_z = (8 - z) * s
    w_z = (u - 8) * s.repeat_interleave(group, 1) + m_z.repeat_interleave(group, 1)
    for grid, offsets in ((w, m), (w_z, m_z)):
        assert torch.equal(_effective("int4z", group, grid.to(_TORCH[src]), s, offsets), grid)
    assert not torch.equal(_effective("int4z", group, w.to(_TORCH[src])), w)  # min/max rule


def test_fp8_and_int4z_bad_input_raise() -> None:
    w8 = torch.zeros(4, 96, dtype=torch.float8_e4m3fn)
    w = torch.randn(4, 96)
    out = torch.empty(4, 96)
    s, m = torch.ones(4, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="fp8 source bytes need their scales"):
        _E.pack_unpack("fp8", 4, 96, 32, w8.data_ptr(), "fp8", out.data_ptr())
    with pytest.raises(ValueError, match="fp8 needs cols divisible by group_size"):
        _E.pack_unpack("fp8", 4, 96, 64, w8.data_ptr(), "fp8", out.data_ptr(), s.data_ptr())
    with pytest.raises(ValueError, match="fp8 group_size 48 is not supported"):
        _E.packed_bytes("fp8", 4, 96, 48)
    with pytest.raises(ValueError, match="int4z group_size 16"):
        _E.packed_bytes("int4z", 4, 96, 16)
    with pytest.raises(ValueError, match="pack only into the fp8 format"):
        _E.pack_unpack("int4", 4, 96, 32, w8.data_ptr(), "fp8", out.data_ptr(), s.data_ptr())
    with pytest.raises(ValueError, match="group scales are for int4, int4z and fp8"):
        _E.pack_unpack("int8", 4, 96, 32, w.data_ptr(), "f32", out.data_ptr(), s.data_ptr())
    with pytest.raises(ValueError, match="group offsets are for int4z"):
        _E.pack_unpack(
            "int4", 4, 96, 32, w.data_ptr(), "f32", out.data_ptr(), s.data_ptr(), m.data_ptr()
        )
    with pytest.raises(ValueError, match="with group scales"):
        _E.pack_unpack("int4z", 4, 96, 32, w.data_ptr(), "f32", out.data_ptr(), 0, m.data_ptr())
    with pytest.raises(ValueError, match="not one of f32, bf16, f16, fp8"):
        _E.pack_unpack("fp8", 4, 96, 32, w.data_ptr(), "e5m2", out.data_ptr(), s.data_ptr())
    with pytest.raises(ValueError, match="int4, fp8, int4z"):
        _E.packed_bytes("fp4", 4, 96, 32)
