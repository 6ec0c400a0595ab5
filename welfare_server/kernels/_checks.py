"""Argument validation shared by the dispatch point, the references and the Triton wrappers.

Shape/dtype/device checks are free (metadata only). Value checks (term indices in [-1, K), mode
values, finite coefficients, labels in [-1, C)) need to look at tensor contents: on CUDA that is
one device->host sync per call (all conditions are reduced into one small tensor and read with a
single .tolist()), roughly 10-30 us and a pipeline drain. They are skipped while a CUDA graph is
being captured (a sync there would abort the capture) and when the caller passes
check_values=False (the engine validates its term tables once when it writes them, via
validate_terms, and then steers every layer without syncing). Unchecked, the kernels still never
read out of bounds: a term with an index outside [-1, K) or an unknown mode is ignored.
"""
from __future__ import annotations

import torch

from welfare_server.kernels.modes import MAX_MONITORS, MAX_PROJ, MAX_TERMS, SteerMode

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _want_value_checks(check_values, *tensors) -> bool:
    if check_values is not None:
        return bool(check_values)
    if any(t.is_cuda for t in tensors) and torch.cuda.is_available():
        if torch.cuda.is_current_stream_capturing():
            return False
    return True


def check_hidden(hidden: torch.Tensor, name: str = "hidden") -> None:
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"{name} must be 2-D [T, D], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype must be one of float32/bfloat16/float16, got {hidden.dtype}")


def check_vectors(vec: torch.Tensor, hidden: torch.Tensor, name: str, max_rows: int | None = None) -> None:
    """A [N, D] table of vectors (bank, monitor, proj_vectors): hidden's dtype or fp32, same device, same D."""
    if vec.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(vec.shape)}")
    if vec.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name} has D={vec.shape[1]} but hidden has D={hidden.shape[1]}")
    if vec.dtype not in (hidden.dtype, torch.float32):
        raise ValueError(f"{name} dtype must be hidden's dtype ({hidden.dtype}) or float32, got {vec.dtype}")
    if vec.device != hidden.device:
        raise ValueError(f"{name} is on {vec.device} but hidden is on {hidden.device}")
    if max_rows is not None and vec.shape[0] > max_rows:
        raise ValueError(f"{name} has {vec.shape[0]} rows; at most {max_rows} are supported")


def check_norm(hidden: torch.Tensor, norm_weight: torch.Tensor, eps) -> None:
    """An RMSNorm's weight [D] (float, hidden's device) and eps (finite, >= 0)."""
    D = hidden.shape[1]
    if norm_weight.dim() != 1 or norm_weight.shape[0] != D:
        raise ValueError(f"norm_weight must be [D={D}], got shape {tuple(norm_weight.shape)}")
    if norm_weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"norm_weight dtype must be float32/bfloat16/float16, got {norm_weight.dtype}")
    if norm_weight.device != hidden.device:
        raise ValueError(f"norm_weight is on {norm_weight.device} but hidden is on {hidden.device}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")


def check_residual(residual, hidden: torch.Tensor) -> None:
    """A residual added to hidden before steering: hidden's shape, dtype and device."""
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    check_out(residual, hidden, "residual")


def check_out(out: torch.Tensor, hidden: torch.Tensor, name: str = "out", dtype=None) -> None:
    dtype = hidden.dtype if dtype is None else dtype
    if out.shape != hidden.shape:
        raise ValueError(f"{name} must have hidden's shape {tuple(hidden.shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise ValueError(f"{name} dtype must be {dtype}, got {out.dtype}")
    if out.device != hidden.device:
        raise ValueError(f"{name} is on {out.device} but hidden is on {hidden.device}")


def check_terms(hidden, bank, term_vector, term_coef, term_mode, check_values=None) -> None:
    """Validate a steering call's metadata, and (unless skipped, see module doc) its term values."""
    check_hidden(hidden)
    check_vectors(bank, hidden, "bank")
    T = hidden.shape[0]
    for name, t, dts in (("term_vector", term_vector, (torch.int32, torch.int64)),
                         ("term_coef", term_coef, (torch.float32,)),
                         ("term_mode", term_mode, (torch.int32, torch.int64))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] != T:
            raise ValueError(f"{name} must be [T={T}, NT], got shape {tuple(t.shape)}")
        if t.dtype not in dts:
            raise ValueError(f"{name} dtype must be one of {[str(d) for d in dts]}, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    NT = term_vector.shape[1]
    if term_coef.shape[1] != NT or term_mode.shape[1] != NT:
        raise ValueError(f"term_vector, term_coef, term_mode must share NT; got "
                         f"{term_vector.shape[1]}, {term_coef.shape[1]}, {term_mode.shape[1]}")
    if NT > MAX_TERMS:
        raise ValueError(f"NT={NT} terms per row exceeds MAX_TERMS={MAX_TERMS}")
    if _want_value_checks(check_values, hidden):
        validate_terms(term_vector, term_coef, term_mode, bank.shape[0])


def validate_terms(term_vector, term_coef, term_mode, K: int) -> None:
    """Value checks of a term table: index in [-1, K), valid mode and finite coef where active.
    One host sync on CUDA (all flags gathered into one tensor)."""
    if term_vector.numel() == 0:
        return
    active = term_vector != -1
    bad_idx = (term_vector < -1) | (term_vector >= K)
    bad_mode = active & ((term_mode < 0) | (term_mode >= len(SteerMode)))
    # One rule for every mode (as model.steering.validate_spec): ABLATE ignores its coefficient, but
    # a non-finite one is still refused, so a table is valid or not whatever its modes.
    bad_coef = active & ~torch.isfinite(term_coef)
    flags = torch.stack([bad_idx.any(), bad_mode.any(), bad_coef.any()]).tolist()
    if flags[0]:
        lo, hi = int(term_vector.min()), int(term_vector.max())
        raise ValueError(f"term_vector values must be in [-1, K={K}) (-1 = no term); got range [{lo}, {hi}]")
    if flags[1]:
        raise ValueError(f"term_mode must be a SteerMode value in [0, {len(SteerMode)}) where term_vector != -1")
    if flags[2]:
        raise ValueError("term_coef must be finite where term_vector != -1 (in every mode)")


def check_monitor(monitor, hidden) -> None:
    if monitor is not None:
        check_vectors(monitor, hidden, "monitor", MAX_MONITORS)


def check_capture(hidden, labels, sums, counts, proj_vectors, check_values=None) -> None:
    check_hidden(hidden)
    T, D = hidden.shape
    if labels.dim() != 1 or labels.shape[0] != T:
        raise ValueError(f"labels must be [T={T}], got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels dtype must be int32 or int64, got {labels.dtype}")
    if sums.dim() != 2 or sums.shape[1] != D:
        raise ValueError(f"sums must be [C, D={D}], got shape {tuple(sums.shape)}")
    if sums.dtype != torch.float32:
        raise ValueError(f"sums must be float32 (the accumulator), got {sums.dtype}")
    C = sums.shape[0]
    if counts.dim() != 1 or counts.shape[0] != C:
        raise ValueError(f"counts must be [C={C}], got shape {tuple(counts.shape)}")
    if counts.dtype != torch.int64:
        raise ValueError(f"counts must be int64, got {counts.dtype}")
    for name, t in (("labels", labels), ("sums", sums), ("counts", counts)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if proj_vectors is not None:
        check_vectors(proj_vectors, hidden, "proj_vectors", MAX_PROJ)
    if _want_value_checks(check_values, hidden) and T > 0:
        bad = ((labels < -1) | (labels >= C)).any().item()
        if bad:
            raise ValueError(f"labels must be in [-1, C={C}) (-1 = skip); got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")


def is_inplace(out: torch.Tensor | None, hidden: torch.Tensor) -> bool:
    return out is not None and (out is hidden or (
        out.data_ptr() == hidden.data_ptr() and out.stride() == hidden.stride() and out.shape == hidden.shape))
