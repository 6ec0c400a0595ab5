"""Case generators, a float64 oracle written straight from the spec (independent of the
alpha/beta form the reference and kernels share), and the tolerance table."""
from __future__ import annotations

import torch

from welfare_server.kernels import SteerMode

ADD, ADD_RENORM, ABLATE, CLAMP = (int(m) for m in SteerMode)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# Per-dtype tolerance: |got - want| <= atol * rms(want row) + rtol * |want|. The kernels
# accumulate in fp32, so bf16/fp16 errors are one rounding of the output (plus a flip at a
# rounding boundary); fp32 errors are reduction-order differences amplified by term chains.
# bf16 allows 2 ulp (2^-6): the Triton 3.6 interpreter's fp32->bf16 cast truncates instead of
# rounding to nearest (measured: 49% of N(0,1) values land 1 ulp from torch's cast; the GPU uses
# cvt.rn), and normed values round twice (LlamaRMSNorm casts before the weight multiply).
TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}

SHAPES_T = [1, 7, 83, 577, 4099]
SHAPES_D = [64, 576, 577, 2048]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gen(seed: int):
    g = torch.Generator().manual_seed(seed)
    return g


def make_steer_case(T, D, dtype, *, seed, K=None, NT=None, bank_fp32=False, device=DEVICE,
                    modes=None, p_active=0.7):
    """Fresh random inputs: hidden ~ N(0,1); bank rows ~ N(0,1) with one zero vector (the v == 0
    guards); coefficients ~ N(0,1) (|c v| ~ |h|); per row a random number of active terms
    (-1 anywhere, some rows entirely untouched); mixed modes."""
    g = gen(seed)
    if K is None:
        K = int(torch.randint(1, 1025, (1,), generator=g))
    if NT is None:
        NT = int(torch.randint(1, 5, (1,), generator=g))
    hidden = torch.randn(T, D, generator=g).to(dtype)
    bank = torch.randn(K, D, generator=g)
    if K > 2:
        bank[K // 2] = 0.0
    bank = bank if bank_fp32 else bank.to(dtype)
    tv = torch.randint(0, K, (T, NT), generator=g, dtype=torch.int32)
    tv[torch.rand(T, NT, generator=g) > p_active] = -1
    if T > 2:
        tv[::3] = -1  # every third row untouched
    if modes is None:
        tm = torch.randint(0, 4, (T, NT), generator=g, dtype=torch.int32)
    else:
        tm = torch.tensor(modes, dtype=torch.int32)[torch.randint(0, len(modes), (T, NT), generator=g)]
    tc = torch.randn(T, NT, generator=g)
    # Garbage where there is no term: must be ignored.
    tm[tv == -1] = 99
    tc[tv == -1] = float("nan")
    return [t.to(device) for t in (hidden, bank, tv, tc, tm)]


def oracle_steer(hidden, bank, tv, tc, tm):
    """float64, per term, each mode by its defining formula, on the rows that use it."""
    x = hidden.double().cpu().clone()
    b = bank.double().cpu()
    tv, tc, tm = tv.cpu(), tc.cpu().double(), tm.cpu()
    for j in range(tv.shape[1]):
        idx = tv[:, j].long()
        for mode in (ADD, ADD_RENORM, ABLATE, CLAMP):
            sel = (idx >= 0) & (tm[:, j] == mode)
            if not sel.any():
                continue
            xs, v, c = x[sel], b[idx[sel]], tc[sel, j][:, None]
            if mode == ADD:
                xs = xs + c * v
            elif mode == ADD_RENORM:
                y = xs + c * v
                n0, n1 = xs.norm(dim=1, keepdim=True), y.norm(dim=1, keepdim=True)
                xs = torch.where(n1 > 0, y * (n0 / torch.where(n1 > 0, n1, 1.0)), y)
            else:
                vv = (v * v).sum(1, keepdim=True)
                ok = vv > 0
                vv1 = torch.where(ok, vv, 1.0)
                if mode == ABLATE:
                    xs = torch.where(ok, xs - ((xs * v).sum(1, keepdim=True) / vv1) * v, xs)
                else:
                    u = v / vv1.sqrt()
                    xs = torch.where(ok, xs + (c - (xs * u).sum(1, keepdim=True)) * u, xs)
            x[sel] = xs
    return x


def assert_rows_close(got, want, dtype, msg=""):
    got = got.double().cpu()
    want = want.double().cpu()
    tol = TOL[dtype]
    assert not torch.isnan(got).any(), f"{msg}: NaN in output (unwritten element?)"
    rms = want.pow(2).mean(-1, keepdim=True).sqrt() if want.dim() == 2 else want.abs().mean()
    bound = tol["atol"] * rms + tol["rtol"] * want.abs()
    err = (got - want).abs()
    bad = err > bound
    assert not bad.any(), (f"{msg}: {int(bad.sum())} elements out of tolerance; max err "
                           f"{float(err.max()):.3g}, first at {bad.nonzero()[0].tolist()}")


def same_bits(a, b):
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a.view(torch.int16), b.view(torch.int16))
