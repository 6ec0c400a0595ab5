"""Validation errors name the argument and the bound; the dispatch point picks by device."""
import pytest
import torch

import welfare_server.kernels as K
from welfare_server.kernels import MAX_MONITORS, MAX_TERMS, capture, steer, steer_rmsnorm, validate_terms
from _helpers import ABLATE, ADD, DEVICE


def _case(T=5, D=64, dtype=torch.float32, NT=2):
    h = torch.randn(T, D).to(dtype)
    b = torch.randn(4, D).to(dtype)
    tv = torch.zeros(T, NT, dtype=torch.int32)
    tc = torch.ones(T, NT)
    tm = torch.zeros(T, NT, dtype=torch.int32)
    return h, b, tv, tc, tm


def _dcase(**kw):
    return [t.to(DEVICE) for t in _case(**kw)]


@pytest.mark.parametrize("impl", [False, True], ids=["reference", "triton"])
def test_index_out_of_range(impl):
    h, b, tv, tc, tm = _dcase()
    tv[2, 1] = 4
    with pytest.raises(ValueError, match=r"term_vector.*\[-1, K=4\)"):
        steer(h, b, tv, tc, tm, use_triton=impl)
    tv[2, 1] = -2
    with pytest.raises(ValueError, match="term_vector"):
        steer(h, b, tv, tc, tm, use_triton=impl)


def test_shape_dtype_device_errors():
    h, b, tv, tc, tm = _case()
    with pytest.raises(ValueError, match="bank has D=65"):
        steer(h, torch.randn(4, 65), tv, tc, tm)
    with pytest.raises(ValueError, match="bank dtype"):
        steer(h.bfloat16(), b.half(), tv, tc, tm)
    with pytest.raises(ValueError, match="bank is on meta"):
        steer(h, b.to("meta"), tv, tc, tm)
    with pytest.raises(ValueError, match=f"MAX_TERMS={MAX_TERMS}"):
        steer(h, b, *[t.repeat(1, 3) for t in (tv, tc, tm)])
    with pytest.raises(ValueError, match="share NT"):
        steer(h, b, tv, tc[:, :1], tm)
    with pytest.raises(ValueError, match="term_coef dtype"):
        steer(h, b, tv, tc.double(), tm)
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        steer(h[None], b, tv, tc, tm)
    with pytest.raises(ValueError, match="hidden dtype"):
        steer(h.double(), b.double(), tv, tc, tm)
    with pytest.raises(ValueError, match=r"term_vector must be \[T=5"):
        steer(h, b, tv[:3], tc, tm)
    with pytest.raises(ValueError, match="out dtype"):
        steer(h, b, tv, tc, tm, out=torch.empty(5, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match=f"at most {MAX_MONITORS}"):
        steer(h, b, tv, tc, tm, monitor=torch.randn(MAX_MONITORS + 1, 64))
    with pytest.raises(ValueError, match="norm_weight must be"):
        steer_rmsnorm(h, b, tv, tc, tm, torch.ones(63), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        steer_rmsnorm(h, b, tv, tc, tm, torch.ones(64), float("nan"))
    with pytest.raises(ValueError, match="normed_out dtype"):
        steer_rmsnorm(h.bfloat16(), b.bfloat16(), tv, tc, tm, torch.ones(64), 1e-6,
                      normed_out=torch.empty(5, 64, dtype=torch.bfloat16))


def test_coef_and_mode_values():
    h, b, tv, tc, tm = _case()
    tc[1, 0] = float("inf")
    with pytest.raises(ValueError, match="term_coef must be finite"):
        steer(h, b, tv, tc, tm)
    tm[1, 0] = ABLATE  # one rule for every mode: ABLATE ignores its coefficient, yet it must be finite
    with pytest.raises(ValueError, match="term_coef must be finite"):
        steer(h, b, tv, tc, tm)
    tm[1, 0] = ADD
    tv[1, 0] = -1  # no term: coef and mode ignored
    tm[1, 0] = 42
    steer(h, b, tv, tc, tm)
    tv[1, 0] = 0
    with pytest.raises(ValueError, match="term_mode"):
        steer(h, b, tv, tc, tm)


@pytest.mark.parametrize("impl", [False, True], ids=["reference", "triton"])
def test_unchecked_bad_terms_are_ignored_not_read(impl):
    """check_values=False: the kernels never read outside the bank; bad terms are no-ops."""
    h, b, tv, tc, tm = _dcase()
    tv[:, 1] = 1000
    tm[:, 0] = 17
    out, _ = steer(h, b, tv, tc, tm, use_triton=impl, check_values=False)
    assert torch.equal(out, h)
    with pytest.raises(ValueError):
        validate_terms(tv, tc, tm, b.shape[0])


def test_capture_errors():
    h = torch.randn(5, 64)
    sums, counts = torch.zeros(3, 64), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"labels must be in \[-1, C=3\)"):
        capture(h, torch.tensor([0, 1, 3, 0, -1]), sums, counts)
    with pytest.raises(ValueError, match="sums must be float32"):
        capture(h, torch.zeros(5, dtype=torch.long), sums.double(), counts)
    with pytest.raises(ValueError, match="counts must be int64"):
        capture(h, torch.zeros(5, dtype=torch.long), sums, counts.int())
    with pytest.raises(ValueError, match=r"labels must be \[T=5\]"):
        capture(h, torch.zeros(4, dtype=torch.long), sums, counts)
    with pytest.raises(ValueError, match="proj_vectors has D=32"):
        capture(h, torch.zeros(5, dtype=torch.long), sums, counts, proj_vectors=torch.randn(2, 32))


def test_dispatch_cpu_uses_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton path taken for CPU tensors")
    monkeypatch.setattr(K, "steer_triton", boom)
    monkeypatch.setattr(K, "steer_rmsnorm_triton", boom)
    monkeypatch.setattr(K, "capture_triton", boom)
    h, b, tv, tc, tm = _case()
    steer(h, b, tv, tc, tm)
    steer_rmsnorm(h, b, tv, tc, tm, torch.ones(64), 1e-6)
    capture(h, torch.zeros(5, dtype=torch.long), torch.zeros(1, 64), torch.zeros(1, dtype=torch.int64))
    # Forced Triton on CPU: our kernel under the interpreter, or a clear error without it.
    with pytest.raises((AssertionError, ValueError)):
        steer(h, b, tv, tc, tm, use_triton=True)
