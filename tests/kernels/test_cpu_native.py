"""The C++ decode ops (kernels.cpu_native) against their torch references, op by op: RMSNorm with
and without the residual add, RoPE in place on a strided q|k view, SiLU-and-multiply, and the
decode attention with its KV-cache write (GQA, sliding windows, rows sharing a slot); and the
calls the ops must leave to torch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from welfare_server.kernels import cpu_native
from welfare_server.kernels.steer_rmsnorm import rmsnorm_reference
from welfare_server.model.engine.adapter import ModelAdapter
from welfare_server.model.engine.attention import additive_mask, attends, gqa_attention

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="the C++ decode ops are not built")

DTYPES = [torch.float32, torch.bfloat16]


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of a's dtype lie between a and b (per element)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    ia, ib = a.view(bits).long(), b.view(bits).long()
    # Map the sign-magnitude bit patterns onto one monotone integer line.
    top = 1 << (8 * a.element_size() - 1)
    ia = torch.where(ia < 0, -(ia + top), ia)
    ib = torch.where(ib < 0, -(ib + top), ib)
    return (ia - ib).abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D", [(1, 576), (3, 64), (8, 577)])
def test_add_rmsnorm_matches_reference(dtype, rows, D):
    g = torch.Generator().manual_seed(rows * D)
    h = (torch.randn(rows, D, generator=g) * 3).to(dtype)
    res = torch.randn(rows, D, generator=g).to(dtype)
    w = torch.randn(D, generator=g).to(dtype)
    summed, y = cpu_native.add_rmsnorm(h, res, w, 1e-5)
    want_sum = h + res
    assert torch.equal(summed, want_sum)  # one rounding of the same sum
    want = rmsnorm_reference(want_sum, w, 1e-5)
    assert y.dtype == want.dtype and y.shape == want.shape
    # The sum of squares accumulates in another order: a last-bit difference in the scale, which
    # a bf16 rounding turns into at most one ulp of a few outputs.
    apart = ulps_apart(y, want)
    assert int(apart.max()) <= (1 if dtype == torch.bfloat16 else 4)
    same_h, normed = cpu_native.add_rmsnorm(h, None, w, 1e-5)
    assert same_h is h
    assert int(ulps_apart(normed, rmsnorm_reference(h, w, 1e-5)).max()) <= (1 if dtype == torch.bfloat16 else 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_is_the_reference_bit_for_bit(dtype):
    """On the q|k columns of a fused qkv output (a strided view), like the engine's call."""
    g = torch.Generator().manual_seed(7)
    T, H, n_kv, hd = 3, 9, 3, 64
    y = torch.randn(T, (H + 2 * n_kv) * hd, generator=g).to(dtype)
    ang = torch.randn(T, 1, hd // 2, generator=g)
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(dtype)
    sin = torch.cat((ang.sin(), ang.sin()), -1).to(dtype)
    sin_signed = torch.cat((-sin[..., :hd // 2], sin[..., hd // 2:]), -1)
    qk = y[:, :(H + n_kv) * hd].view(T, H + n_kv, hd)
    v_before = y[:, (H + n_kv) * hd:].clone()
    cpu_native.USE_NATIVE = False
    try:
        want = ModelAdapter._rope_qk(qk, (cos, sin, sin_signed))
    finally:
        cpu_native.USE_NATIVE = True
    assert want.data_ptr() != qk.data_ptr()
    got = ModelAdapter._rope_qk(qk, (cos, sin, sin_signed))
    assert got.data_ptr() == qk.data_ptr()  # rotated in place
    assert torch.equal(got, want)
    assert torch.equal(y[:, (H + n_kv) * hd:], v_before)  # the v columns are not touched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_silu_times_up(dtype):
    g = torch.Generator().manual_seed(3)
    gu = (torch.randn(4, 2 * 1536, generator=g) * 4).to(dtype)
    got = cpu_native.silu_mul(gu, 1536)
    want = F.silu(gu[:, :1536]) * gu[:, 1536:]
    # exp from libm against torch's vectorised exp: a last-bit difference at most, which a bf16
    # rounding of silu can turn into one ulp before the product.
    assert int(ulps_apart(got, want).max()) <= (2 if dtype == torch.bfloat16 else 8)


class _Layer:
    def __init__(self, n_heads, n_kv, hd, window):
        self.n_heads, self.n_kv, self.head_dim, self.window = n_heads, n_kv, hd, window
        self.scaling, self.softcap = hd ** -0.5, None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 1, 7])
def test_attend_decode_matches_index_put_then_gqa_attention(dtype, window):
    """Three rows, two of them in one slot at consecutive positions (each sees the other's new
    key, as the batched index_put then attention does)."""
    g = torch.Generator().manual_seed(11)
    S, T, H, n_kv, hd = 4, 48, 9, 3, 64
    lay = _Layer(H, n_kv, hd, window)
    k_cache = torch.randn(S, n_kv, T, hd, generator=g).to(dtype)
    v_cache = torch.randn(S, n_kv, T, hd, generator=g).to(dtype)
    slots = torch.tensor([2, 0, 2])
    pos = torch.tensor([20, 47, 21])
    B = len(slots)
    qkv = torch.randn(B, (H + 2 * n_kv) * hd, generator=g).to(dtype)  # strided views, as in the engine
    q = qkv[:, :H * hd].view(B, H, hd)
    k = qkv[:, H * hd:(H + n_kv) * hd].view(B, n_kv, hd)
    v = qkv[:, (H + n_kv) * hd:].view(B, n_kv, hd)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    kc_ref[slots, :, pos] = k
    vc_ref[slots, :, pos] = v
    ctx = int(pos.max()) + 1
    mask = additive_mask(attends(pos, torch.arange(ctx), window)[:, None, None, :], dtype)
    want = gqa_attention(lay, q, kc_ref[slots, :, :ctx], vc_ref[slots, :, :ctx], mask, B, 1)
    got = cpu_native.attend_decode(q, k, v, k_cache, v_cache, slots, pos, window, lay.scaling)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, **tol)


def test_calls_left_to_torch():
    """What the ops do not take returns None / False and changes nothing."""
    x = torch.randn(2, 8)
    assert cpu_native.add_rmsnorm(x.half(), None, torch.ones(8).half(), 1e-5) is None  # fp16
    assert cpu_native.add_rmsnorm(x, None, torch.ones(8).bfloat16(), 1e-5) is None  # mixed dtypes
    assert cpu_native.add_rmsnorm(x.t(), None, torch.ones(2), 1e-5) is None  # not contiguous
    w = torch.ones(8, requires_grad=True)
    assert cpu_native.add_rmsnorm(x, None, w, 1e-5) is None  # autograd recording
    with torch.no_grad():
        assert cpu_native.add_rmsnorm(x, None, w, 1e-5) is not None
    odd = torch.randn(2, 3, 5)
    assert cpu_native.rope_qk_(odd, torch.ones(2, 5), torch.ones(2, 5)) is False  # odd head_dim
    assert cpu_native.silu_mul(torch.randn(2, 10), 4) is None  # not [rows, 2 * inter]
    many = torch.randn(cpu_native.MAX_ROWS + 1, 8)
    assert cpu_native.add_rmsnorm(many, None, torch.ones(8), 1e-5) is None  # a prefill's rows: torch's threads
    assert cpu_native.add_rmsnorm(many[:cpu_native.MAX_ROWS], None, torch.ones(8), 1e-5) is not None
    cpu_native.USE_NATIVE = False
    try:
        assert not cpu_native.available()
        assert cpu_native.silu_mul(torch.randn(2, 8), 4) is None
    finally:
        cpu_native.USE_NATIVE = True


def test_out_of_range_position_is_refused():
    kc = torch.zeros(2, 1, 4, 8)
    q, k = torch.randn(1, 2, 8), torch.randn(1, 1, 8)
    with pytest.raises(ValueError, match="position out of range"):
        cpu_native.attend_decode(q, k, k.clone(), kc, kc.clone(), torch.tensor([0]), torch.tensor([4]), None, 1.0)
    with pytest.raises(ValueError, match="slot out of range"):
        cpu_native.attend_decode(q, k, k.clone(), kc, kc.clone(), torch.tensor([2]), torch.tensor([0]), None, 1.0)
