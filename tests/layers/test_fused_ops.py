"""The fused Triton ops against the torch layers they replace.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
on float32 (tight) and float16 (loose) CPU tensors; tests marked `gpu` run bf16 and full-size
shapes on CUDA, and a CUDA-graph capture/replay of a chain of the ops.
Shapes: `T` tokens, `H` hidden, `D` head size, `nq` / `nkv` q / kv heads, `I` MLP inner size.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
# The CPU-tensor tests here run in the interpreter; GPU tests (marked gpu) run on CUDA.
pytestmark = pytest.mark.triton_interpreter

from twinfer.layers import fused_ops  # noqa: E402
from twinfer.layers.activation import silu_and_mul  # noqa: E402
from twinfer.layers.norm import RMSNorm  # noqa: E402
from twinfer.layers.rotary import RotaryEmbedding  # noqa: E402

EPS = 1e-6
ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, verbatim (two roundings to the dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def make_norm(size: int, dtype: torch.dtype, device: str = "cpu") -> RMSNorm:
    norm = RMSNorm(size, EPS).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * torch.randn(size))
    return norm


def torch_attention_prologue(rot, positions, q, k, head_size, q_norm=None, k_norm=None):
    """What LlamaAttention.forward does between the qkv split and attention."""
    if q_norm is not None:
        t = q.shape[0]
        q = q_norm(q.reshape(t, -1, head_size)).reshape(t, -1)  # [T, nq D]
        k = k_norm(k.reshape(t, -1, head_size)).reshape(t, -1)  # [T, nkv D]
    return rot(positions, q, k)


def fp32_rope_reference(positions, q, k, cache, head_size, q_w=None, k_w=None):
    """Float32 rotation of the (HF-rounded, when normed) inputs: what the kernel rounds once."""
    t, d = q.shape[0], head_size
    cos, sin = cache[positions].chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x, w):
        x = x.reshape(t, -1, d)  # [T, n, D]
        if w is not None:
            x = hf_rms_norm(x, w)
        x = x.float()
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).reshape(t, -1)

    return rotate(q, q_w), rotate(k, k_w)


def fused_qkv(t: int, nq: int, nkv: int, d: int, dtype: torch.dtype, device: str = "cpu"):
    """q, k, v as row-strided views of one [T, (nq + 2 nkv) D] tensor, as after qkv_proj."""
    qkv = torch.randn(t, (nq + 2 * nkv) * d, device=device).to(dtype)
    q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
    return qkv, q, k, v


# ---- interpreter (or GPU) tests on small shapes --------------------------------------------------
@pytest.mark.parametrize("t", [1, 7])
@pytest.mark.parametrize("h", [64, 100])
def test_rms_norm_matches_module_fp32(t: int, h: int) -> None:
    torch.manual_seed(t * h)
    norm = make_norm(h, torch.float32)
    x = torch.randn(t, h)
    out = fused_ops.rms_norm(x, norm.weight, EPS)
    torch.testing.assert_close(out, norm(x), rtol=1e-5, atol=1e-5)
    # A row-strided view (e.g. a slice of a wider buffer) and a 3-D input, as q_norm gets.
    wide = torch.randn(t, h + 24)
    torch.testing.assert_close(
        fused_ops.rms_norm(wide[:, 8 : 8 + h], norm.weight, EPS), norm(wide[:, 8 : 8 + h])
    )
    x3 = torch.randn(t, 3, h)
    out3 = fused_ops.rms_norm(x3, norm.weight, EPS)
    assert out3.shape == x3.shape
    torch.testing.assert_close(out3, norm(x3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 5])
def test_fused_add_rms_norm_matches_module_fp32(t: int) -> None:
    torch.manual_seed(t)
    norm = make_norm(64, torch.float32)
    x, residual = torch.randn(t, 64), torch.randn(t, 64)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_ops.fused_add_rms_norm(x, residual, norm.weight, EPS)
    want_out, want_residual = norm(x, residual)
    assert torch.equal(new_residual, want_residual)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # untouched
    # In place (vLLM's convention): the sum lands in `residual`, the normed output in `x`.
    got_out, got_residual = fused_ops.fused_add_rms_norm(
        x, residual, norm.weight, EPS, inplace=True
    )
    assert got_out is x and got_residual is residual
    assert torch.equal(x, out) and torch.equal(residual, new_residual)


def test_norms_float16_match_hf_formula() -> None:
    torch.manual_seed(0)
    norm = make_norm(96, torch.float16)
    x, residual = torch.randn(9, 96).half(), torch.randn(9, 96).half()
    out = fused_ops.rms_norm(x, norm.weight, EPS)
    want = hf_rms_norm(x, norm.weight)
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
    assert (out == want).float().mean() > 0.9  # rounds where HF rounds
    out, new_residual = fused_ops.fused_add_rms_norm(x, residual, norm.weight, EPS)
    assert torch.equal(new_residual, x + residual)  # the add in the model dtype, as HF
    torch.testing.assert_close(out, hf_rms_norm(x + residual, norm.weight), rtol=2e-3, atol=2e-3)
    # The module (torch's fused rms_norm rounds once) is within an ulp.
    torch.testing.assert_close(out, norm(x, residual)[0], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(
    ("t", "nq", "nkv", "d"),
    [(1, 4, 2, 16), (5, 6, 1, 16), (2, 1, 1, 16), (3, 12, 2, 128), (2, 2, 2, 80)],
)
def test_rotary_matches_torch_path_fp32(t: int, nq: int, nkv: int, d: int, qk_norm: bool) -> None:
    torch.manual_seed(t + nq + d)
    max_pos = 4096
    rot = RotaryEmbedding(d, max_pos, ROPE)
    _, q, k, v = fused_qkv(t, nq, nkv, d, torch.float32)
    assert q.stride(0) == (nq + 2 * nkv) * d  # strided views, not copies
    # Positions far past the first rows of the cache, and one repeated.
    positions = torch.randint(max_pos - 300, max_pos, (t,))
    positions[-1] = positions[0]
    q_norm = make_norm(d, torch.float32) if qk_norm else None
    k_norm = make_norm(d, torch.float32) if qk_norm else None
    want_q, want_k = torch_attention_prologue(rot, positions, q, k, d, q_norm, k_norm)
    got_q, got_k = fused_ops.rotary_embedding(
        positions,
        q,
        k,
        rot.cos_sin_cache,
        d,
        q_norm.weight if qk_norm else None,
        k_norm.weight if qk_norm else None,
        EPS,
    )
    assert got_q.shape == q.shape and got_k.shape == k.shape
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_in_place_into_fused_qkv(qk_norm: bool) -> None:
    torch.manual_seed(1)
    t, nq, nkv, d = 7, 4, 2, 16
    rot = RotaryEmbedding(d, 512, ROPE)
    qkv, q, k, v = fused_qkv(t, nq, nkv, d, torch.float32)
    v_before = v.clone()
    positions = torch.arange(100, 100 + t)
    weights = (make_norm(d, torch.float32).weight, make_norm(d, torch.float32).weight)
    weights = weights if qk_norm else (None, None)
    want_q, want_k = fused_ops.rotary_embedding(positions, q, k, rot.cos_sin_cache, d, *weights)
    got_q, got_k = fused_ops.rotary_embedding(
        positions, q, k, rot.cos_sin_cache, d, *weights, inplace=True
    )
    assert got_q is q and got_k is k
    assert torch.equal(qkv[:, : nq * d], want_q)
    assert torch.equal(qkv[:, nq * d : (nq + nkv) * d], want_k)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_float16(qk_norm: bool) -> None:
    torch.manual_seed(2)
    t, nq, nkv, d = 5, 4, 2, 32
    rot = RotaryEmbedding(d, 2048, ROPE)
    _, q, k, _ = fused_qkv(t, nq, nkv, d, torch.float16)
    positions = torch.tensor([0, 1, 700, 2047, 1500])
    q_norm = make_norm(d, torch.float16) if qk_norm else None
    k_norm = make_norm(d, torch.float16) if qk_norm else None
    q_w = q_norm.weight if qk_norm else None
    k_w = k_norm.weight if qk_norm else None
    got_q, got_k = fused_ops.rotary_embedding(positions, q, k, rot.cos_sin_cache, d, q_w, k_w, EPS)
    # The kernel rounds the float32 rotation once: within an ulp of it.
    ref_q, ref_k = fp32_rope_reference(positions, q, k, rot.cos_sin_cache, d, q_w, k_w)
    torch.testing.assert_close(got_q.float(), ref_q, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_k.float(), ref_k, rtol=1e-3, atol=1e-3)
    # The float16 torch path rounds after every op: loosely equal.
    want_q, want_k = torch_attention_prologue(rot, positions, q, k, d, q_norm, k_norm)
    torch.testing.assert_close(got_q, want_q, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_k, want_k, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("t", "inner"), [(1, 40), (3, 1500)])  # 1500: more than one block
def test_silu_and_mul(t: int, inner: int) -> None:
    torch.manual_seed(inner)
    x = torch.randn(t, 2 * inner) * 3
    torch.testing.assert_close(fused_ops.silu_and_mul(x), silu_and_mul(x), rtol=1e-5, atol=1e-5)
    wide = torch.randn(t, 2 * inner + 16)  # a row-strided view
    view = wide[:, 16:]
    torch.testing.assert_close(fused_ops.silu_and_mul(view), silu_and_mul(view))
    x16 = x.half()
    got = fused_ops.silu_and_mul(x16)
    assert got.shape == (t, inner) and got.dtype == torch.float16
    torch.testing.assert_close(got, silu_and_mul(x16), rtol=2e-3, atol=2e-3)


def test_empty_batch_and_errors() -> None:
    w = torch.ones(64)
    assert fused_ops.rms_norm(torch.empty(0, 64), w, EPS).shape == (0, 64)
    out, res = fused_ops.fused_add_rms_norm(torch.empty(0, 64), torch.empty(0, 64), w, EPS)
    assert out.shape == res.shape == (0, 64)
    assert fused_ops.silu_and_mul(torch.empty(0, 8)).shape == (0, 4)
    rot = RotaryEmbedding(16, 32, ROPE)
    q, k = fused_ops.rotary_embedding(
        torch.empty(0, dtype=torch.long),
        torch.empty(0, 64),
        torch.empty(0, 32),
        rot.cos_sin_cache,
        16,
    )
    assert q.shape == (0, 64) and k.shape == (0, 32)
    with pytest.raises(ValueError, match="up to"):
        fused_ops.rms_norm(torch.randn(1, 40000), torch.ones(40000), EPS)
    with pytest.raises(ValueError, match="both"):
        fused_ops.rotary_embedding(
            torch.zeros(1, dtype=torch.long), torch.randn(1, 32), torch.randn(1, 16),
            rot.cos_sin_cache, 16, torch.ones(16),
        )  # fmt: skip
    with pytest.raises(ValueError, match="divide"):
        fused_ops.rotary_embedding(
            torch.zeros(1, dtype=torch.long), torch.randn(1, 40), torch.randn(1, 16),
            rot.cos_sin_cache, 16,
        )  # fmt: skip


# ---- GPU: bf16, full-size shapes, CUDA graphs ----------------------------------------------------
QWEN3_30B = {"h": 2048, "nq": 32, "nkv": 4, "d": 128, "max_pos": 40960}
BF16_TOL = {"rtol": 1.6e-2, "atol": 1e-2}  # about an ulp of bf16 on O(1) values


def assert_mostly_close(got, want, rtol: float, atol: float, frac: float, max_err: float) -> None:
    """All but a (1 - frac) share of elements within rtol/atol, and every one within max_err."""
    got, want = got.float(), want.float()
    close = torch.isclose(got, want, rtol=rtol, atol=atol).float().mean().item()
    worst = (got - want).abs().max().item()
    assert close >= frac and worst <= max_err, f"{close=:.6f} (want >= {frac}), {worst=:.4f}"


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 256, 4096])
@pytest.mark.parametrize("h", [2048, 7168])
def test_gpu_norms_bf16(t: int, h: int) -> None:
    torch.manual_seed(t + h)
    norm = make_norm(h, torch.bfloat16, "cuda")
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)

    out = fused_ops.rms_norm(x, norm.weight, EPS)
    want = hf_rms_norm(x, norm.weight)
    torch.testing.assert_close(out, want, **BF16_TOL)
    assert (out == want).float().mean() > 0.98  # bit-equal to HF but for rare rsqrt/sum flips
    torch.testing.assert_close(out, norm(x), **BF16_TOL)  # the torch module rounds once

    out, new_residual = fused_ops.fused_add_rms_norm(x, residual, norm.weight, EPS)
    assert torch.equal(new_residual, x + residual)
    want = hf_rms_norm(x + residual, norm.weight)
    torch.testing.assert_close(out, want, **BF16_TOL)
    assert (out == want).float().mean() > 0.98
    torch.testing.assert_close(out, norm(x, residual)[0], **BF16_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("t", [1, 33, 4096])
def test_gpu_rotary_bf16(t: int, qk_norm: bool) -> None:
    torch.manual_seed(t)
    nq, nkv, d, max_pos = (QWEN3_30B[key] for key in ("nq", "nkv", "d", "max_pos"))
    rot = RotaryEmbedding(d, max_pos, {"rope_type": "default", "rope_theta": 1e6}).to("cuda")
    qkv, q, k, v = fused_qkv(t, nq, nkv, d, torch.bfloat16, "cuda")
    positions = torch.randint(0, max_pos, (t,), device="cuda")
    q_norm = make_norm(d, torch.bfloat16, "cuda") if qk_norm else None
    k_norm = make_norm(d, torch.bfloat16, "cuda") if qk_norm else None
    q_w = q_norm.weight if qk_norm else None
    k_w = k_norm.weight if qk_norm else None

    got_q, got_k = fused_ops.rotary_embedding(positions, q, k, rot.cos_sin_cache, d, q_w, k_w, EPS)
    ref_q, ref_k = fp32_rope_reference(positions, q, k, rot.cos_sin_cache, d, q_w, k_w)
    for got, ref in ((got_q, ref_q), (got_k, ref_k)):
        # One rounding of the float32 result: within an ulp of bf16 (2^-7 relative) but where a
        # q/k-norm output rounded the other way (float32 noise at a rounding midpoint).
        assert_mostly_close(got, ref, rtol=8e-3, atol=1e-3, frac=0.999, max_err=0.07)
    # The bf16 torch path rounds cos/sin and every product, and its q/k norm rounds once (not as
    # HF): close, and equal in about half the elements (emulated on the CPU: max error 0.0625,
    # mean 2.2e-3 with the norm).
    want_q, want_k = torch_attention_prologue(rot, positions, q, k, d, q_norm, k_norm)
    for got, want in ((got_q, want_q), (got_k, want_k)):
        assert_mostly_close(got, want, rtol=3e-2, atol=3e-2, frac=0.9999, max_err=0.13)
        assert (got.float() - want.float()).abs().mean() < 4e-3

    in_q, in_k = fused_ops.rotary_embedding(
        positions, q, k, rot.cos_sin_cache, d, q_w, k_w, EPS, inplace=True
    )
    assert in_q.data_ptr() == qkv.data_ptr() and torch.equal(in_q, got_q)
    assert torch.equal(in_k, got_k)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 2048])
@pytest.mark.parametrize("inner", [768, 6144])
def test_gpu_silu_and_mul_bf16(t: int, inner: int) -> None:
    torch.manual_seed(t)
    x = (torch.randn(t, 2 * inner, device="cuda") * 3).to(torch.bfloat16)
    got, want = fused_ops.silu_and_mul(x), silu_and_mul(x)
    torch.testing.assert_close(got, want, **BF16_TOL)
    assert (got == want).float().mean() > 0.98  # differs only where exp() rounds differently


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_a_chain_of_fused_ops() -> None:
    """Capture norm -> q/k-norm + RoPE (in place) -> SiLU-mul -> norm; replay with new inputs."""
    torch.manual_seed(0)
    t, h, nq, nkv, d = 4, *(QWEN3_30B[key] for key in ("h", "nq", "nkv", "d"))
    dt, dev = torch.bfloat16, "cuda"
    rot = RotaryEmbedding(d, 4096, ROPE).to(dev)
    norm, q_norm, k_norm = make_norm(h, dt, dev), make_norm(d, dt, dev), make_norm(d, dt, dev)
    out_norm = make_norm(h // 2, dt, dev)
    # Static inputs, refilled before each replay as the model runner does.
    x = torch.empty(t, h, device=dev, dtype=dt)
    residual = torch.empty_like(x)
    qkv_in = torch.empty(t, (nq + 2 * nkv) * d, device=dev, dtype=dt)
    positions = torch.empty(t, device=dev, dtype=torch.long)

    def fill() -> None:
        x.copy_(torch.randn(t, h))
        residual.copy_(torch.randn(t, h))
        qkv_in.copy_(torch.randn(qkv_in.shape))
        positions.copy_(torch.randint(0, 4096, (t,)))

    def chain() -> tuple[torch.Tensor, ...]:
        hidden, res = fused_ops.fused_add_rms_norm(x, residual, norm.weight, EPS)  # [T, H]
        qkv = qkv_in.clone()
        q, k, _ = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
        fused_ops.rotary_embedding(
            positions, q, k, rot.cos_sin_cache, d, q_norm.weight, k_norm.weight, EPS, inplace=True
        )
        act = fused_ops.silu_and_mul(hidden)  # [T, H/2]
        out = fused_ops.rms_norm(act, out_norm.weight, EPS)
        return hidden, res, qkv, act, out

    fill()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile every kernel before capture
        for _ in range(2):
            chain()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outs = chain()
    for _ in range(3):
        fill()
        graph.replay()
        eager = chain()
        torch.cuda.synchronize()
        for got, want in zip(static_outs, eager, strict=True):
            assert torch.equal(got, want)
        # And the eager chain is the unfused math.
        want_hidden, want_res = norm(x, residual)
        torch.testing.assert_close(static_outs[0], want_hidden, **BF16_TOL)
        assert torch.equal(static_outs[1], want_res)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n", "k"), [(37, 200), (5, 1100)])
def test_gemv_matches_linear(n: int, k: int, bias: bool) -> None:
    """Batch-1 linear layers on the GEMV kernel equal F.linear (float32; odd N, K past a tile)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled there, interpreted here
    gen = torch.Generator(device).manual_seed(n)
    x = torch.randn(1, k, generator=gen, device=device)
    w = torch.randn(n, k, generator=gen, device=device)
    b = torch.randn(n, generator=gen, device=device) if bias else None
    expected = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(fused_ops.gemv(x, w, b), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one row"):
        fused_ops.gemv(torch.randn(2, k, device=device), w)


@pytest.mark.gpu
def test_gemv_bf16_on_gpu() -> None:
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) / 64
    ref = torch.nn.functional.linear(x.float(), w.float())
    torch.testing.assert_close(fused_ops.gemv(x, w).float(), ref, atol=2e-2, rtol=1e-2)
