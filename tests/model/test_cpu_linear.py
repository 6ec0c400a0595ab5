"""cpu_linear: the small-M C++ kernel (welfare_server._cpu_linear) equals a float64 reference within
fp32 rounding on odd shapes, every row count 1..9, with and without bias, fp32 and bf16 weights and
activations, for every instruction set this CPU runs (the others are skipped, detected here from
/proc/cpuinfo, not through the kernel); it writes every output element and nothing else; its
thread split changes no bit; strided inputs are handled; make_linear routes each call as the
decision table says (kernel for few rows, oneDNN-packed where this CPU packs the dtype, F.linear
otherwise) and the engine's greedy tokens are the same on every path."""
import pytest
import torch
import torch.nn.functional as F

from tests.model.conftest import rand_prompts
from welfare_server.model import cpu_linear
from welfare_server.model.engine import Engine, EngineConfig, Request, SamplingParams

ck = pytest.importorskip("welfare_server._cpu_linear", reason="the C++ small-M kernel is not built")

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
CODE = {torch.float32: ck.FLOAT32, torch.bfloat16: ck.BFLOAT16}
COMBOS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
"""(weight dtype, activation dtype) pairs the kernel computes."""




def _isas():
    """Every kernel, skipped where this CPU lacks its instructions (checked independently)."""
    flags = cpu_linear.cpu_flags()
    have_avx2 = {"avx2", "fma"} <= flags
    return [pytest.param("portable"),
            pytest.param("avx2", marks=pytest.mark.skipif(not have_avx2, reason="this CPU lacks AVX2+FMA"))]


def test_isa_detection_matches_cpuinfo():
    flags = cpu_linear.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert ck.isa_supported("portable")
    assert ck.isa_supported("avx2") == ({"avx2", "fma"} <= flags)
    assert cpu_linear.kernel_isa() == ("avx2" if {"avx2", "fma"} <= flags else "portable")


def _reference(x, w, b):
    """float64 y and the sum of |terms| per element (the scale of fp32 accumulation error)."""
    x64, w64 = x.double(), w.double()
    y = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if b is not None:
        y = y + b.double()
        mag = mag + b.double().abs()
    return y, mag


def _check(y, x, w, b):
    ref, mag = _reference(x, w, b)
    if y.dtype == torch.float32:
        # fp32 accumulation in another order than MKL's: a few ulps of the sum of |terms|.
        err = (y.double() - ref).abs()
        assert bool((err <= 2e-6 * mag + 1e-30).all()), f"max err {err.max().item():.3g}"
    else:
        # One bf16 rounding of a value within fp32 error of ref: at most one bf16 ulp away from
        # ref rounded to bf16 (ties may fall either side after fp32 accumulation).
        want = ref.float().bfloat16().float()
        ulp = torch.where(want == 0, torch.full_like(want, 2.0 ** -133), want.abs() * 2.0 ** -7)
        err = (y.double() - want.double()).abs()
        assert bool((err <= ulp.double() + 2e-6 * mag).all()), f"max err {err.max().item():.3g}"


def _raw(x, w, b, *, ldy_pad=0, threads=1, isa="auto", ldx=None):
    """Calls the kernel directly into a NaN-filled output wider than O (padding must stay NaN)."""
    M, I = x.shape
    O = w.shape[0]
    y = torch.full((M, O + ldy_pad), float("nan"), dtype=x.dtype)
    ck.linear(x.data_ptr(), x.stride(0) if ldx is None else ldx, CODE[x.dtype], w.data_ptr(), CODE[w.dtype],
              0 if b is None else b.data_ptr(), CODE[b.dtype] if b is not None else 0,
              y.data_ptr(), O + ldy_pad, M, I, O, threads, isa)
    assert torch.isnan(y[:, O:]).all(), "wrote past O"
    return y[:, :O]


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("wdt,xdt", COMBOS)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_float64_odd_shapes(isa, wdt, xdt, bias):
    g = torch.Generator().manual_seed(7)
    for O in (1, 7, 83, 577):
        for I in (1, 7, 16, 17, 83, 577):
            w = torch.randn(O, I, generator=g).to(wdt)
            b = torch.randn(O, generator=g).to(wdt) if bias else None
            for M in range(1, 10):
                x = torch.randn(M, I, generator=g).to(xdt)
                y = _raw(x, w, b, ldy_pad=3, isa=isa)
                assert not torch.isnan(y).any(), f"unwritten output O={O} I={I} M={M}"
                _check(y, x, w, b)


@pytest.mark.parametrize("isa", _isas())
def test_kernel_bias_dtype_may_differ_and_x_rows_may_be_strided(isa):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(83, 577, generator=g).bfloat16()
    b = torch.randn(83, generator=g)  # fp32 bias with bf16 weights
    wide = torch.randn(5, 600, generator=g)
    x = wide[:, :577]  # rows 600 apart
    _check(_raw(x, w, b, isa=isa), x, w, b)
    # ldx = 0 repeats one row
    one = torch.randn(1, 577, generator=g)
    y = _raw(one.expand(4, 577), w, b, isa=isa, ldx=0)
    assert torch.equal(y, y[:1].expand(4, 83))


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("wdt,xdt", COMBOS)
def test_thread_split_changes_no_bit(isa, wdt, xdt):
    """Each output is computed by the same code whichever thread takes its rows, so any thread
    count gives the same bits; O small (one chunk) and large (many), the pool forced on."""
    saved = ck.min_parallel_bytes()
    ck.set_min_parallel_bytes(0)
    try:
        g = torch.Generator().manual_seed(11)
        for O in (9, 577, 5000):
            w = torch.randn(O, 577, generator=g).to(wdt)
            b = torch.randn(O, generator=g).to(wdt)
            for M in (1, 3, 8):
                x = torch.randn(M, 577, generator=g).to(xdt)
                ys = [_raw(x, w, b, threads=t, isa=isa) for t in (1, 2, 3, 4)]
                _check(ys[0], x, w, b)
                for y in ys[1:]:
                    assert torch.equal(y, ys[0])
    finally:
        ck.set_min_parallel_bytes(saved)


def test_pool_wakes_sleeping_workers():
    """With no spinning, every call must still wake the worker (or run without it) correctly."""
    saved_spin, saved_min = ck.spin_us(), ck.min_parallel_bytes()
    ck.set_spin_us(0)
    ck.set_min_parallel_bytes(0)
    try:
        w = torch.randn(2000, 64)
        x = torch.randn(2, 64)
        want = _raw(x, w, None, threads=1)
        for _ in range(200):
            assert torch.equal(_raw(x, w, None, threads=2), want)
    finally:
        ck.set_spin_us(saved_spin)
        ck.set_min_parallel_bytes(saved_min)


def test_kernel_refuses_bad_arguments():
    w = torch.randn(4, 3)
    x = torch.randn(2, 3)
    y = torch.empty(2, 4)

    def call(**kw):
        args = dict(x=x.data_ptr(), ldx=3, x_dtype=ck.FLOAT32, w=w.data_ptr(), w_dtype=ck.FLOAT32, bias=0,
                    bias_dtype=0, y=y.data_ptr(), ldy=4, M=2, I=3, O=4)
        args.update(kw)
        ck.linear(**args)

    call()
    for bad in (dict(M=-1), dict(ldy=3), dict(x_dtype=ck.BFLOAT16), dict(x=0), dict(x_dtype=5),
                dict(isa="avx1024"), dict(ldx=-1)):
        with pytest.raises(ValueError):
            call(**bad)


# ---- make_linear: the decision table -------------------------------------------------------------

def _onednn_packs(dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=dtype), 8)
        return True
    except (RuntimeError, AttributeError):
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 83])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel", [False, True])
def test_linear_matches_f_linear(dtype, rows, bias, kernel):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(577, 83, generator=g).to(dtype)
    b = torch.randn(577, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 83, generator=g).to(dtype)
    lin = cpu_linear.make_linear(w, b, kernel=kernel)
    # make_linear packs exactly when oneDNN can pack this dtype on this CPU (detected here on its
    # own, not through cpu_linear), and falls back to F.linear otherwise.
    assert lin.is_packed == _onednn_packs(dtype)
    assert lin.uses_kernel == kernel
    on_kernel = kernel and rows <= lin.kernel_max_rows(dtype)
    if kernel:
        want_max = cpu_linear.KERNEL_MAX_ROWS[(dtype, dtype)] if lin.is_packed else cpu_linear.KERNEL_MAX_ROWS_NO_PACKING
        assert lin.kernel_max_rows(dtype) == want_max
    y = torch.full((rows, 577), float("nan"), dtype=dtype)
    got = lin(x)
    assert got.is_contiguous() and got.shape == (rows, 577)
    y.copy_(got)
    if on_kernel:
        _check(y, x, w, b)
    elif lin.is_packed:
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), atol=atol, rtol=rtol)
    else:
        assert torch.equal(y, F.linear(x, w, b))
    assert lin.weight is w  # the original is referenced, not copied


def test_linear_bf16_weight_fp32_activations():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(83, 577, generator=g).bfloat16()
    b = torch.randn(83, generator=g).bfloat16()
    x = torch.randn(3, 577, generator=g)
    y = cpu_linear.make_linear(w, b, prepack=False)(x)
    assert y.dtype == torch.float32
    _check(y, x, w, b)


def test_linear_strided_and_batched_inputs():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(83, 64, generator=g)
    b = torch.randn(83, generator=g)
    lin = cpu_linear.make_linear(w, b)
    base = torch.randn(4, 2, 128, generator=g)
    cases = [base[0, 0, :64],            # 1-D
             base[:, 0, :64],            # rows 256 apart
             base[:, :, ::2],            # stride 2 along features: copied
             base[:, :, :64],            # 3-D, non-contiguous: copied
             base[:, :, :64].transpose(0, 1),
             torch.randn(64, 3, generator=g).T]  # transposed rows
    for x in cases:
        y = lin(x)
        assert y.shape == x.shape[:-1] + (83,)
        ref, mag = _reference(x.reshape(-1, 64), w, b)
        assert bool(((y.reshape(-1, 83).double() - ref).abs() <= 2e-6 * mag).all())


def test_linear_autograd_and_wrong_shapes_fall_back():
    w = torch.randn(7, 5, requires_grad=True)
    lin = cpu_linear.make_linear(w, prepack=False)
    x = torch.randn(2, 5, requires_grad=True)
    lin(x).sum().backward()  # F.linear under autograd: gradients flow
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, w))
    with pytest.raises(RuntimeError):
        lin(torch.randn(2, 6))  # F.linear's own error, not a kernel read past the row


def test_linear_rebinds_when_storage_is_replaced():
    w = torch.randn(83, 64)
    lin = cpu_linear.make_linear(w, prepack=False)
    x = torch.randn(1, 64)
    w.data = torch.randn(83, 64)  # new storage: the old address must not be read
    torch.testing.assert_close(lin(x), F.linear(x, w), atol=1e-5, rtol=1e-5)
    w.data = torch.randn(64, 83).T  # not contiguous: no kernel, F.linear
    assert torch.equal(lin(x), F.linear(x, w))
    assert not lin.uses_kernel


def test_packing_support_probe_matches_onednn():
    for dtype in (torch.float32, torch.bfloat16):
        assert cpu_linear.packing_supported(dtype) == _onednn_packs(dtype)
    assert not cpu_linear.packing_supported(torch.float16)  # never packed: F.linear


def test_fallbacks_are_f_linear():
    w = torch.randn(5, 3)
    assert not cpu_linear.make_linear(w, prepack=False, kernel=False).is_packed
    assert not cpu_linear.make_linear(w.half()).is_packed  # fp16 on CPU: F.linear
    assert not cpu_linear.make_linear(w.half()).uses_kernel
    x = torch.randn(2, 3)
    assert torch.equal(cpu_linear.make_linear(w, prepack=False, kernel=False)(x), F.linear(x, w))
    big = torch.randn(9, 3)  # beyond the kernel's rows with no packed copy: F.linear
    lin = cpu_linear.make_linear(w, prepack=False)
    if lin.kernel_max_rows(torch.float32) < 9:
        assert torch.equal(lin(big), F.linear(big, w))


def test_engine_prepack_on_off_same_tokens_and_refresh(get_model):
    lm = get_model("tiny-llama")
    prompts = rand_prompts([5, 17, 9], seed=2)

    def run(eng):
        return [o.token_ids for o in eng.generate(
            [Request(prompt=p, sampling=SamplingParams(max_new_tokens=10, ignore_eos=True)) for p in prompts])]

    cfg = {"max_batch_slots": 4, "max_context_len": 64}
    packed = Engine(lm, EngineConfig(**cfg))
    plain = Engine(lm, EngineConfig(cpu_prepack=False, **cfg))
    assert packed.adapter.lm_head.is_packed == cpu_linear.packing_supported(torch.float32)
    assert not plain.adapter.lm_head.is_packed
    assert run(packed) == run(plain)
    # The packed copies are snapshots: refresh_weights() picks up in-place weight changes.
    down = lm.model.model.layers[0].mlp.down_proj.weight
    saved = down.detach().clone()
    try:
        with torch.no_grad():
            down.mul_(-3.0)
        packed.refresh_weights()
        assert run(packed) == run(plain)
    finally:
        with torch.no_grad():
            down.copy_(saved)
        packed.refresh_weights()


def test_engine_kernel_on_off_same_tokens(get_model, monkeypatch):
    lm = get_model("tiny-llama")
    prompts = rand_prompts([5, 17, 9], seed=3)

    def run(eng):
        return [o.token_ids for o in eng.generate(
            [Request(prompt=p, sampling=SamplingParams(max_new_tokens=10, ignore_eos=True)) for p in prompts])]

    cfg = {"max_batch_slots": 4, "max_context_len": 64}
    with_kernel = Engine(lm, EngineConfig(**cfg))
    assert with_kernel.adapter.lm_head.uses_kernel
    monkeypatch.setattr(cpu_linear, "USE_KERNEL", False)
    without = Engine(lm, EngineConfig(cpu_prepack=False, **cfg))
    assert not without.adapter.lm_head.uses_kernel
    assert run(with_kernel) == run(without)
