"""The static decode step (what Engine captures in a CUDA graph) is capturable: it issues no op that
needs the host to read a device value, and its steering is one Triton launch per steered point.

CUDA graph capture fails on any host sync (.item(), nonzero, boolean-mask indexing, ...). CI has
no GPU, so this records every aten op the step dispatches (TorchDispatchMode) with the Triton
wrappers on the path a GPU takes (their kernels recorded, not run) and refuses the sync ops."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import welfare_server.kernels as kernels
from tests.model.conftest import rand_vec
from welfare_server.kernels import SteerMode
from welfare_server.model.engine import Engine, EngineConfig

# Ops whose result the host must read on CUDA (a stream sync), or whose output shape depends on
# device data.
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::nonzero_static",
            "aten::masked_select", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
            "aten::is_nonzero", "aten::equal", "aten::allclose", "aten::repeat_interleave",
            "aten::_assert_async"}


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.residual_adds = 0
        self.hidden_shape = None  # adds whose result has this shape count as residual adds

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in SYNC_OPS:
            self.syncs.append(name)
        if name in ("aten::index", "aten::index_put", "aten::index_put_"):
            # A boolean index is a nonzero in disguise.
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None):
                self.syncs.append(name + " with a boolean index")
        out = func(*args, **kwargs)
        if name == "aten::add" and isinstance(out, torch.Tensor) and tuple(out.shape) == self.hidden_shape:
            self.residual_adds += 1
        return out


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: kernel[grid](...) records the launch."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((self.name, grid, kw))


@pytest.fixture
def gpu_kernel_path(monkeypatch):
    """Route steering through the Triton wrappers (as on CUDA) with their launches recorded."""
    launches = []
    for module, attr in (("welfare_server.kernels.steer", "_steer_kernel"),
                         ("welfare_server.kernels.steer_rmsnorm", "_steer_rmsnorm_kernel")):
        mod = importlib.import_module(module)
        if not hasattr(mod, attr):
            pytest.skip("triton is not installed")
        monkeypatch.setattr(mod, attr, _LaunchRecorder(attr, launches))
    monkeypatch.setattr(kernels, "_use_triton", lambda use_triton, hidden, steer_kernel: True)
    return launches


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("steer_in,steer_out", [(False, False), (True, False), (True, True)])
def test_static_step_has_no_host_sync_and_one_launch_per_point(get_model, gpu_kernel_path, steer_in, steer_out,
                                                               family):
    lm = get_model(family)
    L, D = lm.config.num_hidden_layers, lm.config.hidden_size
    eng = Engine(lm, EngineConfig(max_batch_slots=4, max_context_len=64, graph_ctx_bucket=16,
                                  static_decode=True))
    # Every slot carries a term at every layer and point, as the bank/table buffers would hold.
    idx = eng.register_vector(rand_vec(D, 1))
    eng.passes.tv[:, :, :, 0] = idx
    eng.passes.tc[:, :, :, 0] = 2.0
    eng.passes.tm[:, :, :, 0] = int(SteerMode.ADD_RENORM)
    eng.passes.pos_buf[:4] = torch.tensor([3, 7, 0, 15])
    eng.passes.ids_buf[:4] = torch.tensor([5, 9, 11, 13])
    recorder = _OpRecorder()
    recorder.hidden_shape = (4, D)
    with torch.inference_mode(), recorder:
        logits = eng.passes.static_step(4, 16, steer_in, steer_out)
    assert recorder.syncs == []
    assert logits.shape == (4, eng.vocab)
    # Every RMSNorm of the step is one launch of the steer_rmsnorm kernel (with the block-input
    # terms, or none): two per layer, four with Gemma2/3's sandwich norms, and the final norm.
    norms_per_layer = 2 + 2 * (eng.layers[0].post_attn is not None)
    launched = [name for name, _, _ in gpu_kernel_path]
    assert launched.count("_steer_rmsnorm_kernel") == L * norms_per_layer + 1
    assert launched.count("_steer_kernel") == (L if steer_out else 0)
    steered_norms = [kw for name, _, kw in gpu_kernel_path if name == "_steer_rmsnorm_kernel" and kw["NT"] > 0]
    assert len(steered_norms) == (L if steer_in else 0)
    # Residual adds are folded into the norms after them (HAS_RES launches), except where a block's
    # output is steered (h itself is needed there) and after the last layer.
    folded = [kw for name, _, kw in gpu_kernel_path if name == "_steer_rmsnorm_kernel" and kw["HAS_RES"]]
    assert len(folded) == (L if steer_out else 2 * L - 1)
    assert recorder.residual_adds == (L if steer_out else 1)
    # One program row block covers the whole decode batch: a single launch per steered point.
    assert all(grid == (1,) for _, grid, _ in gpu_kernel_path)


def test_the_recorder_catches_a_sync(gpu_kernel_path):
    """The check is live: the ops it refuses are seen when they happen."""
    recorder = _OpRecorder()
    x = torch.arange(6.0)
    with recorder:
        x.sum().item()
        x[x > 2]
        x.nonzero()
    assert recorder.syncs[0] == "aten::_local_scalar_dense"
    assert "aten::index with a boolean index" in recorder.syncs and "aten::nonzero" in recorder.syncs
