// Dispatch and threading of the small-M linear (see linear.h).
//
// The pool: workers = threads - 1 persistent threads; the caller works too. A call publishes its
// job under a new generation in one 64-bit ticket and then takes chunks of W rows itself; workers
// take chunks from the same ticket by compare-and-swap, so a worker that is late (descheduled,
// asleep) simply finds nothing left and the caller never waits for it to start, only for chunks
// already taken to finish. Idle workers spin for spin_us() (the next linear of a decode step
// usually follows within tens of microseconds) and then sleep on a condition variable: a worker
// that spun forever fought torch's OpenMP threads for the cores and made the whole step ~20x
// slower in the prototype.
#include "cpu_linear/linear.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cpu_linear/kernels.h"

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace ws::cpu_linear {
namespace {

using detail::Job;
using detail::Kernel;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

int detect_max_threads() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Tunables (set_*). Defaults measured on the 2-core AMD EPYC (Zen 2) VM; see the setters' users
// in welfare_server/model/cpu_linear.py for the numbers.
std::atomic<int> g_default_threads{0};  // 0: max_threads()
std::atomic<int> g_spin_us{50};
std::atomic<int64_t> g_min_parallel_bytes{64 * 1024};
constexpr int64_t kChunkBytes = 64 * 1024;  // W bytes per chunk a thread takes at a time
constexpr int64_t kRowTile = 32;            // rows of x per pass over W (see linear())

// Ticket: generation (32 bits) | worker cap (8 bits) | chunks not yet taken (24 bits).
constexpr int kCapShift = 24, kGenShift = 32;
constexpr uint64_t kRemainingMask = (uint64_t{1} << kCapShift) - 1;
constexpr int64_t kMaxChunks = int64_t{1} << 23;
constexpr int kMaxWorkers = 255;

inline uint32_t gen_of(uint64_t t) { return static_cast<uint32_t>(t >> kGenShift); }
inline int cap_of(uint64_t t) { return static_cast<int>((t >> kCapShift) & 0xFF); }
inline int64_t remaining_of(uint64_t t) { return static_cast<int64_t>(t & kRemainingMask); }

class Pool {
 public:
  Pool() = default;
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // Runs rows over [0, O) in chunks on the caller and up to `workers` pool threads. Returns false
  // (and does nothing) when another call holds the pool: the caller then runs alone.
  bool run(void (*rows)(const Job&, int64_t, int64_t), const Job& job, int64_t O, int64_t chunk_rows,
           int workers) {
    std::unique_lock<std::mutex> call(call_mutex_, std::try_to_lock);
    if (!call.owns_lock()) return false;
    ensure_workers(workers);
    const int64_t nchunks = (O + chunk_rows - 1) / chunk_rows;
    rows_ = rows;
    job_ = &job;
    O_ = O;
    chunk_rows_ = chunk_rows;
    nchunks_ = nchunks;
    finished_.store(0, std::memory_order_relaxed);
    const uint32_t gen = ++gen_;
    ticket_.store((uint64_t{gen} << kGenShift) | (uint64_t(workers) << kCapShift) | uint64_t(nchunks),
                  std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(sleep_mutex_); }
      sleep_cv_.notify_all();
    }
    int64_t mine = 0;
    for (int64_t c; (c = claim(gen, -1)) >= 0;) {
      do_chunk(c);
      ++mine;
    }
    finished_.fetch_add(mine, std::memory_order_relaxed);
    // A worker still on a chunk finishes it within a chunk's time (~5 us) unless the OS took its
    // core; then yield, so a worker preempted onto this core can run instead of being spun past.
    for (int spins = 0; finished_.load(std::memory_order_acquire) < nchunks; ++spins) {
      if (spins < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
    return true;
  }

 private:
  // Takes one chunk of generation gen (worker index k, or -1 for the caller); -1 when none is left.
  int64_t claim(uint32_t gen, int k) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      if (gen_of(t) != gen || remaining_of(t) == 0 || k >= cap_of(t)) return -1;
      if (ticket_.compare_exchange_weak(t, t - 1, std::memory_order_acq_rel, std::memory_order_acquire))
        return nchunks_ - remaining_of(t);  // job fields are stable while a chunk is outstanding
    }
  }

  void do_chunk(int64_t c) {
    const int64_t o0 = c * chunk_rows_;
    rows_(*job_, o0, std::min(O_, o0 + chunk_rows_));
  }

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      const int k = static_cast<int>(workers_.size());
      workers_.emplace_back([this, k] { worker(k); });
      workers_.back().detach();  // the pool lives until the process ends
    }
  }

  void worker(int k) {
    uint32_t seen = gen_of(ticket_.load(std::memory_order_acquire));
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_acquire);
      if (gen_of(t) == seen) {
        wait_for_new_generation(seen);
        continue;
      }
      seen = gen_of(t);
      int64_t done = 0;
      for (int64_t c; (c = claim(seen, k)) >= 0;) {
        do_chunk(c);
        ++done;
      }
      if (done) finished_.fetch_add(done, std::memory_order_release);
    }
  }

  void wait_for_new_generation(uint32_t seen) {
    const auto start = std::chrono::steady_clock::now();
    const auto spin = std::chrono::microseconds(g_spin_us.load(std::memory_order_relaxed));
    while (gen_of(ticket_.load(std::memory_order_acquire)) == seen) {
      cpu_relax();
      if (std::chrono::steady_clock::now() - start >= spin) {
        std::unique_lock<std::mutex> lk(sleep_mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        sleep_cv_.wait(lk, [&] { return gen_of(ticket_.load(std::memory_order_seq_cst)) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        return;
      }
    }
  }

  std::mutex call_mutex_;
  std::vector<std::thread> workers_;
  uint32_t gen_ = 0;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> finished_{0};
  // The job: written by the caller before it publishes the ticket, read by workers after a claim.
  void (*rows_)(const Job&, int64_t, int64_t) = nullptr;
  const Job* job_ = nullptr;
  int64_t O_ = 0, chunk_rows_ = 1, nchunks_ = 0;
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::atomic<int> sleepers_{0};
};

std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_pool_once;

void reset_pool_in_child() {
  // The parent's workers do not exist in a forked child; its pool (and any lock a parent thread
  // held in it) is abandoned and a fresh one made on the next call.
  g_pool.store(nullptr, std::memory_order_relaxed);
}

Pool& pool() {
  std::call_once(g_pool_once, [] {
#if defined(__linux__)
    pthread_atfork(nullptr, nullptr, reset_pool_in_child);
#endif
  });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (!p) {
    static std::mutex make_mutex;
    std::lock_guard<std::mutex> lk(make_mutex);
    p = g_pool.load(std::memory_order_acquire);
    if (!p) {
      p = new Pool();  // never deleted: detached workers may still be spinning on it at exit
      g_pool.store(p, std::memory_order_release);
    }
  }
  return *p;
}

int element_size(DType t) { return t == DType::kF32 ? 4 : 2; }

void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("cpu_linear: ") + what);
}

}  // namespace

bool isa_supported(Isa isa) {
  static const bool avx2 = cpu_has_avx2_fma();
  return isa == Isa::kAvx2 ? avx2 : (isa == Isa::kAuto || isa == Isa::kPortable);
}

Isa best_isa() { return isa_supported(Isa::kAvx2) ? Isa::kAvx2 : Isa::kPortable; }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kPortable: return "portable";
    default: return "auto";
  }
}

int max_threads() {
  static const int n = detect_max_threads();
  return n;
}

void set_default_threads(int threads) { g_default_threads.store(std::max(0, threads)); }
int default_threads() {
  const int n = g_default_threads.load();
  return n > 0 ? n : max_threads();
}
void set_spin_us(int microseconds) { g_spin_us.store(std::max(0, microseconds)); }
int spin_us() { return g_spin_us.load(); }
void set_min_parallel_bytes(int64_t bytes) { g_min_parallel_bytes.store(std::max<int64_t>(0, bytes)); }
int64_t min_parallel_bytes() { return g_min_parallel_bytes.load(); }

void linear(const Args& a, int threads, Isa isa) {
  check(a.M >= 0 && a.I >= 0 && a.O >= 0, "negative size");
  check(a.x_dtype == DType::kF32 || a.x_dtype == DType::kBF16, "x dtype");
  check(a.w_dtype == DType::kF32 || a.w_dtype == DType::kBF16, "W dtype");
  check(a.bias_dtype == DType::kF32 || a.bias_dtype == DType::kBF16, "bias dtype");
  check(!(a.w_dtype == DType::kF32 && a.x_dtype == DType::kBF16), "fp32 W needs fp32 x");
  check(a.ldy >= a.O, "ldy < O");
  check(a.ldx >= 0, "ldx < 0");
  if (a.M == 0 || a.O == 0) return;
  check(a.y != nullptr, "y is null");
  check(a.I == 0 || (a.x != nullptr && a.w != nullptr), "x or W is null");
  if (isa == Isa::kAuto) isa = best_isa();
  if (!isa_supported(isa)) throw std::invalid_argument(std::string("cpu_linear: this CPU lacks ") + isa_name(isa));
  const Kernel k = isa == Isa::kAvx2 ? detail::avx2_kernel(a.w_dtype) : detail::portable_kernel(a.w_dtype);

  if (threads <= 0) threads = default_threads();
  threads = std::min({threads, max_threads(), kMaxWorkers + 1});
  const int64_t row_bytes = std::max<int64_t>(a.I * element_size(a.w_dtype), 1);
  const int64_t w_bytes = row_bytes * a.O;
  // Chunks of whole 12-row groups (every plan's row block, 2, 3 or 4, divides 12), about
  // kChunkBytes of W each.
  int64_t chunk_rows = std::max<int64_t>(12, (kChunkBytes / row_bytes + 11) / 12 * 12);
  chunk_rows = std::max(chunk_rows, (a.O + kMaxChunks - 1) / kMaxChunks);
  const bool parallel = threads > 1 && w_bytes >= min_parallel_bytes() && a.O > chunk_rows;
  // No more workers than chunks left after the caller's first: more would only contend.
  const int workers = static_cast<int>(std::min<int64_t>(threads - 1, (a.O + chunk_rows - 1) / chunk_rows - 1));

  // x widened once per tile into a per-thread scratch. Rows of x are taken kRowTile at a time:
  // each block of W rows meets every row of the tile while it is in L1, and the tile itself
  // (32 x 1536 fp32 = 196 KB at most for these models) stays in L2; an untiled prefill of
  // thousands of rows would stream all of x from memory once per block of W.
  thread_local std::vector<float> scratch;
  const int64_t ldxs = std::max<int64_t>(a.I, 1);
  const int64_t tile = std::min(a.M, kRowTile);
  if (static_cast<int64_t>(scratch.size()) < tile * ldxs) scratch.resize(tile * ldxs);
  const int esx = element_size(a.x_dtype);
  for (int64_t m0 = 0; m0 < a.M; m0 += tile) {
    const int64_t mt = std::min(tile, a.M - m0);
    if (a.I > 0)
      k.prep_x(static_cast<const char*>(a.x) + m0 * a.ldx * esx, a.ldx, a.x_dtype, mt, a.I, scratch.data(), ldxs);
    Job job;
    job.xs = scratch.data();
    job.ldxs = ldxs;
    job.w = a.w;
    job.bias = a.bias;
    job.bias_dtype = a.bias_dtype;
    job.y = static_cast<char*>(a.y) + m0 * a.ldy * esx;
    job.ldy = a.ldy;
    job.y_dtype = a.x_dtype;
    job.M = mt;
    job.I = a.I;
    if (!(parallel && pool().run(k.rows, job, a.O, chunk_rows, workers))) k.rows(job, 0, a.O);
  }
}

}  // namespace ws::cpu_linear
