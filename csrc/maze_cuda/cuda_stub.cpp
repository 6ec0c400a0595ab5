// Built instead of cuda_backend.cu when the CUDA backend is off or nvcc is missing: the API exists
// so callers can probe cuda_compiled(), and every call says why it cannot run.
#include <stdexcept>

#include "cuda_backend.h"

namespace ws {
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("welfare_server was built without the CUDA backend");
}
}  // namespace

bool cuda_compiled() { return false; }
void cuda_reset(const PreparedConfig&, const StateView&, const uint8_t*, uintptr_t, bool) {
  no_cuda();
}
void cuda_step(const PreparedConfig&, const StateView&, const int32_t*, const StepOut&, uintptr_t) {
  no_cuda();
}
void cuda_clone(const PreparedConfig&, const StateView&, int64_t, int64_t, int64_t, bool, uintptr_t) {
  no_cuda();
}
void cuda_observe(const PreparedConfig&, const StateView&, const ObserveOut&, uintptr_t) {
  no_cuda();
}
void cuda_observe(const PreparedConfig&, const StateView&, int32_t*, int32_t*, uintptr_t) { no_cuda(); }
void cuda_render_tokens(const PreparedConfig&, const StateView&, const TokenTable&, int32_t*, int32_t*,
                        uintptr_t) {
  no_cuda();
}
size_t cuda_oracle_scratch_bytes(const PreparedConfig&, int64_t) { no_cuda(); }
void cuda_oracle(const PreparedConfig&, const StateView&, int32_t*, uint8_t*, void*, size_t, uintptr_t) {
  no_cuda();
}

}  // namespace ws
