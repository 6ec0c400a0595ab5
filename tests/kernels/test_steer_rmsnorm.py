"""steer_rmsnorm: the steered rows as steer() gives them, and normed = LlamaRMSNorm(steered) * w,
so fused equals unfused (steer, then the next block's input norm)."""
import pytest
import torch

from welfare_server.kernels import add_rmsnorm, rmsnorm, rmsnorm_reference, steer, steer_rmsnorm
from _helpers import (DEVICE, DTYPES, ON_GPU, assert_rows_close, make_steer_case,
                      oracle_steer, same_bits)

CASES = [(1, 64, torch.float32), (7, 577, torch.bfloat16), (83, 576, torch.float16),
         (577, 2048, torch.bfloat16), (83, 2048, torch.float32)]
if ON_GPU:
    CASES += [(4099, d, dt) for d in (64, 576, 577, 2048) for dt in DTYPES]


def _ids(c):
    return f"T{c[0]}-D{c[1]}-{str(c[2]).split('.')[-1]}"


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fused_equals_unfused(case, impl, inplace):
    T, D, dtype = case
    hidden, bank, tv, tc, tm = make_steer_case(T, D, dtype, seed=T + D + int(inplace))
    w = (torch.rand(D) + 0.5).to(dtype).to(DEVICE)
    eps = 1e-6
    orig = hidden.clone()
    untouched = (tv == -1).all(1).cpu()
    normed_out = torch.full((T, D), float("nan"), dtype=dtype, device=DEVICE)
    out = hidden if inplace else torch.full_like(hidden, float("nan"))
    s, n, p = steer_rmsnorm(hidden, bank, tv, tc, tm, w, eps, out=out, normed_out=normed_out,
                            use_triton=(impl == "triton"))
    assert s is out and n is normed_out and p is None
    want = oracle_steer(orig, bank, tv, tc, tm)
    assert_rows_close(s, want, dtype, "steered")
    assert same_bits(s.cpu()[untouched], orig.cpu()[untouched])
    # normed vs LlamaRMSNorm of the very rows we stored: only reduction order / rsqrt differ.
    assert_rows_close(n, rmsnorm_reference(s, w, eps), dtype, "normed")
    # ... and vs the unfused path from scratch.
    s2, _ = steer(orig.clone(), bank, tv, tc, tm, use_triton=(impl == "triton"))
    assert_rows_close(n, rmsnorm_reference(s2, w, eps), dtype, "normed vs unfused")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_normed_dtype_follows_weight_and_monitor(impl):
    """fp32 weight with bf16 hidden -> fp32 normed, as LlamaRMSNorm returns; monitors fused."""
    T, D = 7, 576
    hidden, bank, tv, tc, tm = make_steer_case(T, D, torch.bfloat16, seed=11)
    w = torch.rand(D, device=DEVICE) + 0.5
    mon = torch.randn(3, D, device=DEVICE)
    s, n, p = steer_rmsnorm(hidden, bank, tv, tc, tm, w, 1e-5, monitor=mon, monitor_post=False,
                            use_triton=(impl == "triton"))
    assert n.dtype == torch.float32 and p.shape == (T, 3)
    # The normed value passes through bf16 (LlamaRMSNorm's cast before the weight): bf16 tolerance.
    assert_rows_close(n, rmsnorm_reference(s, w, 1e-5), torch.bfloat16, "fp32-weight normed")
    torch.testing.assert_close(p, hidden.float() @ mon.t(), rtol=1e-4, atol=1e-4)


def test_rmsnorm_reference_matches_llama_formula():
    x = torch.randn(5, 64).to(torch.bfloat16)
    w = torch.rand(64).to(torch.bfloat16)
    xs = x.float()
    want = w * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(rmsnorm_reference(x, w, 1e-6), want)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_rmsnorm_alone_equals_llama_rmsnorm_and_leaves_hidden(case, impl):
    """rmsnorm(): the norm-only pass (the engine's unsteered norms) computes LlamaRMSNorm and never
    writes hidden, also from a row-strided view."""
    T, D, dtype = case
    big = torch.randn(T, 2 * D, generator=torch.Generator().manual_seed(T + D)).to(dtype).to(DEVICE) * 3
    hidden = big[:, :D]  # row stride 2D: not contiguous
    w = (torch.rand(D) + 0.5).to(dtype).to(DEVICE)
    before = big.clone()
    got = rmsnorm(hidden, w, 1e-5, use_triton=(impl == "triton"))
    assert got.shape == (T, D) and got.dtype == dtype
    assert_rows_close(got, rmsnorm_reference(hidden, w, 1e-5).double(), dtype, "rmsnorm")
    assert same_bits(big, before)
    with pytest.raises(ValueError, match="norm_weight must be"):
        rmsnorm(hidden, w[:-1], 1e-5, use_triton=(impl == "triton"))
    with pytest.raises(ValueError, match="eps"):
        rmsnorm(hidden, w, float("nan"), use_triton=(impl == "triton"))


def assert_same_sum(got, want, impl):
    """The kernels round hidden + residual as torch does (fp32 add, one rounding): bit for bit,
    except under the CPU interpreter, whose fp32 -> bf16 cast truncates instead of rounding to
    nearest even (then within one bf16 step)."""
    if impl == "triton" and not ON_GPU and want.dtype == torch.bfloat16:
        ulp = want.float().abs().clamp_min(1e-30) * 2.0 ** -7
        assert ((got.float() - want.float()).abs() <= ulp).all()
    else:
        assert same_bits(got, want)


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_residual_is_added_before_steering(case, impl, inplace):
    """steer_rmsnorm(h, ..., residual=r) = steer_rmsnorm(h + r, ...) (the sum rounded in hidden's
    dtype), and every row is written, the untouched ones as exactly h + r."""
    T, D, dtype = case
    hidden, bank, tv, tc, tm = make_steer_case(T, D, dtype, seed=3 * T + D + int(inplace))
    residual = torch.randn(T, D, generator=torch.Generator().manual_seed(D)).to(dtype).to(DEVICE)
    w = (torch.rand(D) + 0.5).to(dtype).to(DEVICE)
    # The sum as this implementation rounds it (see assert_same_sum), checked against torch's.
    summed, _ = add_rmsnorm(hidden, residual, w, 1e-6, use_triton=(impl == "triton"))
    assert_same_sum(summed, hidden + residual, impl)
    untouched = (tv == -1).all(1).cpu()
    out = hidden if inplace else torch.full_like(hidden, float("nan"))
    s, n, _ = steer_rmsnorm(hidden, bank, tv, tc, tm, w, 1e-6, out=out, residual=residual,
                            use_triton=(impl == "triton"))
    assert s is out
    assert_rows_close(s, oracle_steer(summed, bank, tv, tc, tm), dtype, "steered")
    assert_same_sum(s.cpu()[untouched], summed.cpu()[untouched], impl)
    assert_rows_close(n, rmsnorm_reference(s, w, 1e-6), dtype, "normed")


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_add_rmsnorm(case, impl):
    T, D, dtype = case
    g = torch.Generator().manual_seed(T * D)
    hidden, residual = (torch.randn(T, D, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    w = (torch.rand(D, generator=g) + 0.5).to(dtype).to(DEVICE)
    orig = hidden.clone()
    summed, normed = add_rmsnorm(hidden, residual, w, 1e-5, use_triton=(impl == "triton"))
    assert_same_sum(summed, orig + residual, impl)
    assert same_bits(hidden, orig)
    assert_rows_close(normed, rmsnorm_reference(summed, w, 1e-5).double(), dtype, "normed")
    with pytest.raises(ValueError, match="residual"):
        add_rmsnorm(hidden, residual[:, :-1], w, 1e-5, use_triton=(impl == "triton"))
