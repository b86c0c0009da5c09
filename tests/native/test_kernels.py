"""The native CPU expert kernels (matmul_rows through `_engine.matmul`) against torch references.

Shapes: T tokens, R rows (outputs), C cols (inputs). y [T, R] = x [T, C] @ W^T.
The reference runs on the values the kernels compute with: bf16/f16/f32 weights as given, int8 and
int4 weights dequantized (`pack_unpack`), in float64 with the same float32 activations. The rule is
the issue's: ||y - ref|| / ||ref|| < 1e-3 for every format, on every ISA this CPU has.
"""

from __future__ import annotations

import pytest
import torch

from twinfer.native import native_engine, native_error

pytestmark = pytest.mark.skipif(native_engine is None, reason=native_error or "no native engine")
_E = native_engine
_TORCH = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# (format, group size, source dtype): int8/int4 quantize from float32 (the loader's usual input).
_FORMATS = [
    ("f32", 0, "f32"),
    ("bf16", 0, "bf16"),
    ("f16", 0, "f16"),
    ("int8", 0, "f32"),
    ("int4", 32, "bf16"),
    ("int4", 64, "f32"),
    ("int4", 128, "f32"),
]
_TOKENS = [1, 2, 3, 7, 8, 16, 33, 64]


def _isas() -> list[str]:
    if _E is None:
        return []
    names = _E.isa_names()
    return names[: names.index(_E.cpu_features()["isa"]) + 1]


def _matmul(fmt, group, w, x, isa, split=1, x_bf16=True) -> torch.Tensor:
    y = torch.full((x.shape[0], w.shape[0]), float("nan"))
    src = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[w.dtype]
    _E.matmul(
        fmt,
        w.shape[0],
        w.shape[1],
        group,
        w.data_ptr(),
        src,
        x.data_ptr(),
        x.shape[0],
        y.data_ptr(),
        isa,
        split,
        x_bf16,
    )
    return y


def _effective(fmt, group, w) -> torch.Tensor:
    """The weights as the kernels see them (float32 [R, C])."""
    if fmt in ("f32", "bf16", "f16"):
        return w.float()
    out = torch.empty(w.shape)
    src = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[w.dtype]
    _E.pack_unpack(fmt, w.shape[0], w.shape[1], group, w.data_ptr(), src, out.data_ptr())
    return out


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def _shapes(group: int) -> list[tuple[int, int]]:
    """(R, C): odd row counts (not multiples of the 16-row blocks), C = 64 .. 2048."""
    if group:  # int4: C % group == 0
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
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_matmul_prefill_sized(fmt: str, isa: str) -> None:
    """200 tokens (several AMX token blocks plus a partial one), activations exact in bf16 too."""
    g = torch.Generator().manual_seed(7)
    rows, cols, group = 45, 1024, 128 if fmt == "int4" else 0
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
    for fmt, group in (("int8", 0), ("int4", 32), ("bf16", 0)):
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
