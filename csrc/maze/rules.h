// The maze rules, RNG and draw order of docs/maze_spec.md, as header-only functions shared by the
// CPU backend (csrc/maze/cpu_backend.cpp) and the CUDA backend (csrc/maze_cuda/*.cu). Both backends
// call exactly these functions so their results are bitwise equal; the CPU tests therefore exercise
// the device logic too. Pure C++17: nothing here knows of Python, torch or the CUDA runtime.
//
// Floating point: rewards are only float32 additions in a fixed order (no multiply, so no FMA
// contraction can differ between host and device; CMakeLists.txt also builds the CUDA backend with
// --fmad=false so a future product cannot silently break parity) and no branch depends on a float.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define WS_HD __host__ __device__ __forceinline__
#else
#define WS_HD inline
#endif

// SSE2 (the x86-64 baseline) for byte compares in plain host builds; nvcc builds, device or host
// side, take the portable loop (the CUDA backend never generates on the host).
#if !defined(__CUDACC__) && (defined(__SSE2__) || defined(_M_X64))
#define WS_HOST_SSE2 1
#include <emmintrin.h>
#else
#define WS_HOST_SSE2 0
#endif

namespace ws {

// ---- codes (shared with welfare_server/maze/config.py) ------------------------------------------
enum Tile : uint8_t { PATH = 0, MOLD = 1, GOLD = 2 };
enum Dir : int { NORTH = 0, EAST = 1, SOUTH = 2, WEST = 3 };

WS_HD int dir_drow(int d) { return d == NORTH ? -1 : (d == SOUTH ? 1 : 0); }
WS_HD int dir_dcol(int d) { return d == EAST ? 1 : (d == WEST ? -1 : 0); }
WS_HD int opposite(int d) { return (d + 2) & 3; }

// ---- RNG (spec "RNG"): counter based, every draw a pure function of its address ----------------
constexpr uint64_t GOLDEN = 0x9E3779B97F4A7C15ull;
constexpr uint64_t EPISODE_SALT = 0x57454C4641524531ull;  // "WELFARE1"
constexpr uint64_t EPISODE_MUL = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t GEN_SALT = 0x47454E4552415445ull;   // "GENERATE"
constexpr uint64_t STEP_SALT = 0x5354455053545550ull;  // "STEPSTUP"
constexpr uint64_t CLONE_SALT = 0x434C4F4E45000000ull;  // "CLONE\0\0\0"

WS_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
WS_HD uint64_t episode_key(uint64_t seed, uint64_t env, uint64_t episode) {
  return mix64(mix64(mix64(seed ^ EPISODE_SALT) ^ (env * GOLDEN)) ^ (episode * EPISODE_MUL));
}
WS_HD uint64_t gen_key(uint64_t k) { return mix64(k ^ GEN_SALT); }
WS_HD uint64_t step_key_of(uint64_t k) { return mix64(k ^ STEP_SALT); }
WS_HD uint64_t clone_key(uint64_t src_step_key, uint64_t dst) {
  return mix64(src_step_key ^ mix64(CLONE_SALT + dst));
}
WS_HD uint64_t draw(uint64_t key, uint64_t counter) { return mix64(key + (counter + 1) * GOLDEN); }
// n < 2^32, so the product fits in 64 bits.
WS_HD uint32_t uniform(uint64_t key, uint64_t counter, uint64_t n) {
  return static_cast<uint32_t>(((draw(key, counter) >> 32) * n) >> 32);
}
WS_HD bool bernoulli(uint64_t key, uint64_t counter, uint64_t threshold) {
  return (draw(key, counter) >> 32) < threshold;
}

// The generator's draws (spec "Generation"): a stream of 32-bit words, two per 64-bit draw, low
// half first. Word w is the (w & 1) half of draw(key, w >> 1). This halves the SplitMix64 calls of
// a size-100 maze (16k -> 8k) and lets one 512-bit vector of 8 draws feed 16 selection decisions
// (cpu_sampler.cpp); the episode's draws (step_key) stay whole 64-bit draws.
WS_HD uint32_t gen_word(uint64_t key, uint64_t w) {
  return static_cast<uint32_t>(draw(key, w >> 1) >> ((w & 1) * 32));
}
// Integer in [0, n) from one word: (word * n) >> 32, n < 2^32.
WS_HD uint32_t uniform_word(uint32_t word, uint64_t n) {
  return static_cast<uint32_t>((static_cast<uint64_t>(word) * n) >> 32);
}
WS_HD uint32_t gen_uniform(uint64_t key, uint64_t w, uint64_t n) {
  return uniform_word(gen_word(key, w), n);
}
// Sequential reader of a key's word stream from word index `index`; one mix64 per two words.
struct WordStream {
  uint64_t x;      // argument of mix64 for the next draw to compute
  uint64_t high;   // high half of the last computed draw (valid when the next word is odd)
  uint64_t index;  // word index of the next word
  WS_HD WordStream(uint64_t key, uint64_t w)
      : x(key + ((w >> 1) + 1) * GOLDEN), high(0), index(w) {
    if (w & 1) {
      high = mix64(x) >> 32;
      x += GOLDEN;
    }
  }
  WS_HD uint32_t next() {
    uint32_t word;
    if (index & 1) {  // alternates, so the branch predicts perfectly
      word = static_cast<uint32_t>(high);
    } else {
      const uint64_t h = mix64(x);
      x += GOLDEN;
      high = h >> 32;
      word = static_cast<uint32_t>(h);
    }
    ++index;
    return word;
  }
};

// ---- configuration ------------------------------------------------------------------------------
// The rule fields, listed once as (type, name, value): the struct below and the binding's field
// table (csrc/bindings.cpp) are generated from this list. welfare_server/maze/config.py's MazeConfig
// is the one place the fields are documented and their defaults chosen; the Python side passes
// every field (tests/maze/test_core_binding.py checks the two lists match). The values here are
// the paper's, for C++ tests and benchmarks only.
#define WS_CONFIG_FIELDS(X)          \
  X(int32_t, size, 100)              \
  X(int32_t, episode_steps, 15)      \
  X(double, wind_prob, 0.1)          \
  X(bool, melting, true)             \
  X(float, step_reward, -0.1f)       \
  X(float, mold_reward, -10.0f)      \
  X(float, gold_reward, 20.0f)       \
  X(int32_t, walk_min_mult, 5)       \
  X(int32_t, walk_max_mult, 15)      \
  X(double, mold_fraction_min, 0.10) \
  X(double, mold_fraction_max, 0.50) \
  X(double, gold_ratio, 0.2)         \
  X(bool, shuffle_directions, true)  \
  X(bool, autoreset, false)

// The rules plus the seed (which the Python side keeps beside MazeConfig). Plain data so it is
// passed by value to kernels. Derived fields are filled by ws::prepare() (config.h), which
// validates first; the functions below assume a prepared config.
struct Config {
#define WS_CONFIG_MEMBER(type, name, value) type name = value;
  WS_CONFIG_FIELDS(WS_CONFIG_MEMBER)
#undef WS_CONFIG_MEMBER
  uint64_t seed = 0;
  // derived (spec "Generation" step 5, "RNG" threshold)
  int32_t n = 0;                // size - 2
  int64_t interior = 0;         // n * n
  int64_t mold_lo = 0;          // int(mold_fraction_min * interior) + 1
  int64_t mold_hi = 0;          // int(mold_fraction_max * interior) - 1
  uint64_t wind_threshold = 0;  // min(2^32, floor(wind_prob * 2^32))
};

// ---- batch state in caller-provided buffers -----------------------------------------------------
struct StateView {
  int64_t num_envs = 0;
  uint8_t* grid = nullptr;          // [B, S, S]
  int32_t* row = nullptr;           // [B]
  int32_t* col = nullptr;           // [B]
  int32_t* t = nullptr;             // [B] step index
  int32_t* wind_from = nullptr;     // [B] wind message of the current prompt: -1 or from-direction
  int64_t* episode = nullptr;       // [B]
  uint64_t* step_key = nullptr;     // [B] (an int64 tensor on the Python side; same bits)
  uint8_t* done = nullptr;          // [B]
  int64_t* origin_env = nullptr;    // [B] maze provenance: (env, episode) the grid was generated as
  int64_t* origin_episode = nullptr;
};

struct StepOut {
  float* reward = nullptr;         // [B]
  int32_t* tile_entered = nullptr;  // [B]
  int32_t* tile_pushed = nullptr;   // [B] -1 without a push
  int32_t* wind_from = nullptr;     // [B] -1 without a push
  uint8_t* done = nullptr;          // [B]
};

// What observe() writes per env. neighbours and order are required; the others may be null
// (not written): valid is neighbours >= 0 as 0/1 bytes (a torch.bool tensor's storage), position
// is (col, row) as the prompt shows it, step_index and wind_from copy the state's t and wind_from
// so an observation is a snapshot that later steps do not change.
struct ObserveOut {
  int32_t* neighbours = nullptr;  // [B, 4] tile code in N, E, S, W or -1 outside the grid
  int32_t* order = nullptr;       // [B, 4] listed directions in prompt order, padded with -1
  uint8_t* valid = nullptr;       // [B, 4]
  int32_t* position = nullptr;    // [B, 2]
  int32_t* step_index = nullptr;  // [B]
  int32_t* wind_from = nullptr;   // [B]
};

// Token fragment table (layout: welfare_server/maze/text.py; built by welfare_server/maze/tokens.py):
// fragment f is ids[offsets[f] : offsets[f+1]].
struct TokenTable {
  const int32_t* ids = nullptr;
  const int32_t* offsets = nullptr;
  int32_t num_fragments = 0;
  int32_t max_len = 0;
  int32_t pad_id = 0;
};
enum Fragment : int32_t {
  FRAG_WIND = 0,  // + from-direction
  FRAG_HEAD_PLAIN = 4,
  FRAG_HEAD_AFTER_WIND = 5,
  FRAG_CLOSE = 6,
  FRAG_TAIL = 7,
  FRAG_TURN_PREFIX = 8,
  FRAG_TURN_SUFFIX = 9,
  FRAG_CLAUSE = 10,  // + ((dir*3 + tile)*2 + first)*2 + last
  FRAG_XNUM = 58,    // + col; then FRAG_XNUM + size + row is YNUM
};
WS_HD int32_t expected_num_fragments(int32_t size) { return FRAG_XNUM + 2 * size; }
// A turn has at most 1 prefix + 2 wind/head + 2 numbers + 1 close + 4 clauses + tail + suffix.
constexpr int MAX_TURN_FRAGMENTS = 12;

// ---- generation (spec "Generation") -------------------------------------------------------------
// BFS visiting order over the whole grid from the centre (step 7): depends only on size, so both
// backends compute it once per size (config.cpp) and generate_maze() scans it.
//
// Speed (CPU): a maze's cost is its ~16k selection-sampling decisions at size 100 (one 32-bit word
// each, two words per mix64). The words are counter based, so consecutive ones are independent
// and overlap in the pipeline; what costs is branching on random data. Candidates are therefore
// found 64 cells at a time as a bit mask and visited with count-trailing-zeros, and the
// select/skip decision is branch-free. (This portable routine: ~20 us of a 23 us maze on the
// AVX-512 dev box, ~38 of 42 on the Zen 2 AVX2 VM; the CPU backend's SIMD routines in
// cpu_sampler.cpp decide 16 (AVX-512: ~6.5 us of 9) or 8 (AVX2: ~18 of 21) candidates per vector.)

WS_HD int ctz64(uint64_t w) {
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(w)) - 1;
#else
  return __builtin_ctzll(w);
#endif
}

// Bit c of the result is line[c] == value, for c in [0, len), len <= 64. Never reads past len.
WS_HD uint64_t match_mask(const uint8_t* line, int32_t len, uint8_t value) {
  uint64_t m = 0;
  int32_t c = 0;
#if WS_HOST_SSE2
  const __m128i v = _mm_set1_epi8(static_cast<char>(value));
  for (; c + 16 <= len; c += 16) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line + c));
    m |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(x, v))))
         << c;
  }
#endif
  for (; c < len; ++c) m |= static_cast<uint64_t>(line[c] == value) << c;
  return m;
}

// One decision of Algorithm S: select `cell` (turn it from `from` to `from ^ diff`) iff
// uniform(rem) < need; returns 1 if selected, else 0.
WS_HD uint64_t select_one(uint8_t* cell, uint32_t word, uint8_t from, uint32_t diff, uint64_t rem,
                          uint64_t& nd) {
  // u = uniform(remaining) is off the serial chain; only `u < need; need -= sel` is on it
  // (2 cycles per candidate; comparing h * rem with need << 32 measured slower)
  const uint64_t sel = uniform_word(word, rem) < nd;
  // arithmetic select: a ?: here compiles to a branch on random data when from/to are not
  // compile-time constants (measured 2x slower generation)
  *cell = static_cast<uint8_t>(from ^ (diff & (0u - static_cast<uint32_t>(sel))));
  nd -= sel;
  return sel;
}

// Knuth's Algorithm S over the interior cells whose tile is `from`, in increasing index, turning
// `need` of them into `to`; `remaining` is the number of such cells. A word of the generator's
// stream is used for each visited `from` cell until need reaches 0; `counter` (a word index)
// advances by the number of words used. Candidates go in pairs, one mix64 per pair (no per-word
// parity test: 29 -> 24 us per size-100 maze, portable).
WS_HD void selection_sample(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to,
                            int64_t need, int64_t remaining, uint64_t key, uint64_t& counter) {
  if (need <= 0) return;
  uint64_t idx = counter;                          // word index of the next decision
  uint64_t x = key + ((idx >> 1) + 1) * GOLDEN;    // mix64 argument of the draw holding word idx
  uint32_t pending = 0;                            // high half of the last draw, when idx is odd
  if (idx & 1) {
    pending = static_cast<uint32_t>(mix64(x) >> 32);
    x += GOLDEN;
  }
  const uint32_t diff = static_cast<uint32_t>(from ^ to);
  // `remaining` at word idx is end - idx (one word per candidate), one live variable less on a
  // loop that spills
  const uint64_t end = idx + static_cast<uint64_t>(remaining);
  uint64_t nd = static_cast<uint64_t>(need);
  for (int32_t r = 1; r <= n; ++r) {
    uint8_t* line = grid + static_cast<int64_t>(r) * size + 1;
    for (int32_t c0 = 0; c0 < n; c0 += 64) {
      const int32_t len = n - c0 < 64 ? n - c0 : 64;
      uint64_t w = match_mask(line + c0, len, from);
      if ((idx & 1) && w) {  // finish the half-used draw
        const int b = ctz64(w);
        w &= w - 1;
        select_one(line + c0 + b, pending, from, diff, end - idx, nd);
        ++idx;
        if (nd == 0) break;
      }
      while (w & (w - 1)) {  // two candidates, one draw: low half, then high half
        const uint64_t h = mix64(x);
        x += GOLDEN;
        const int b0 = ctz64(w);
        w &= w - 1;
        const int b1 = ctz64(w);
        w &= w - 1;
        select_one(line + c0 + b0, static_cast<uint32_t>(h), from, diff, end - idx, nd);
        // if the first completed the sample the second cannot be selected (u < 0): its cell is
        // unchanged and only the word count needs the exact end, below
        const uint64_t second = select_one(line + c0 + b1, static_cast<uint32_t>(h >> 32), from,
                                           diff, end - idx - 1, nd);
        idx += 2;
        if (nd == 0) {
          // one test per pair, not per candidate (a spill of the first test's flag had put a
          // store and reload on the serial chain: 27.4 -> 22.4 us per maze through cpu_sampler)
          idx -= 1 - second;  // the second not selected: the sample ended at the first
          break;
        }
      }
      if (nd == 0) break;
      if (w) {  // a last candidate takes a draw's low half; its high half waits for the next one
        const uint64_t h = mix64(x);
        x += GOLDEN;
        pending = static_cast<uint32_t>(h >> 32);
        select_one(line + c0 + ctz64(w), static_cast<uint32_t>(h), from, diff, end - idx, nd);
        ++idx;
        if (nd == 0) break;
      }
    }
    if (nd == 0) break;
  }
  counter = idx;  // need <= remaining, so the sample always completes
}

// The k-th (0-based) set bit of a 4-bit mask of open directions (bit d = direction d), as a
// direction; packed as 2 bits per (mask, k) in two words so the walk needs no table in memory
// (device code included) and no data-dependent branch.
constexpr uint64_t walk_pick_word(int half) {
  uint64_t word = 0;
  for (int idx = 0; idx < 32; ++idx) {
    const int m = (half * 32 + idx) / 4, k = (half * 32 + idx) % 4;
    int seen = 0, d = 0;
    for (int b = 0; b < 4; ++b)
      if ((m >> b) & 1) {
        if (seen == k) d = b;
        ++seen;
      }
    word |= static_cast<uint64_t>(d) << (2 * idx);
  }
  return word;
}
constexpr uint64_t WALK_PICK_LO = walk_pick_word(0);
constexpr uint64_t WALK_PICK_HI = walk_pick_word(1);

// One walk move (spec "Generation" step 4) from interior cell (r, c) with word `word`: to a
// uniformly picked interior neighbour.
WS_HD void walk_move(uint32_t word, int32_t n, int32_t& r, int32_t& c) {
  int d;
  if (static_cast<uint32_t>(r - 2) < static_cast<uint32_t>(n - 2) &&
      static_cast<uint32_t>(c - 2) < static_cast<uint32_t>(n - 2)) {
    // 1 < r < n and 1 < c < n: all four neighbours are interior, so the list is N, E, S, W and
    // uniform(4) is the word's top two bits. The position's serial chain is then just the adds
    // below (the branch is predicted: the walk is mostly away from the border): the walk went
    // from 9 us to ~2.5 us per size-100 maze.
    d = static_cast<int>(word >> 30);
  } else {
    // interior neighbours in N, E, S, W order, as bits
    const uint32_t open = static_cast<uint32_t>(r > 1) | (static_cast<uint32_t>(c < n) << 1) |
                          (static_cast<uint32_t>(r < n) << 2) | (static_cast<uint32_t>(c > 1) << 3);
    const uint64_t count = (open & 1) + ((open >> 1) & 1) + ((open >> 2) & 1) + (open >> 3);
    const uint32_t idx = open * 4 + uniform_word(word, count);
    d = static_cast<int>(((idx < 32 ? WALK_PICK_LO : WALK_PICK_HI) >> (2 * (idx & 31))) & 3);
  }
  // branch-free deltas (nibble d of the constant, minus 1): with dir_drow/dir_dcol the compiler
  // branched on the random direction, ~27 cycles per step (7.7 us per maze) in mispredictions
  r += static_cast<int32_t>((0x1210u >> (4 * d)) & 0xFu) - 1;  // N -1, E 0, S +1, W 0
  c += static_cast<int32_t>((0x0121u >> (4 * d)) & 0xFu) - 1;  // N 0, E +1, S 0, W -1
}

// One walk step: the move, then carve the cell entered, keeping the interior Mold count.
WS_HD void walk_step(uint32_t word, int32_t n, int32_t S, uint8_t* grid, int32_t& r, int32_t& c,
                     int64_t& mold) {
  walk_move(word, n, r, c);
  uint8_t& cell = grid[static_cast<int64_t>(r) * S + c];
  mold -= (cell == MOLD);
  cell = PATH;
}

// Step 4's random walk: L steps from interior cell (r, c) with the words of gen key g from word
// `counter` on, carving Path and keeping the interior Mold count `mold`.
WS_HD void random_walk(uint64_t g, uint64_t counter, uint64_t L, int32_t n, int32_t S, uint8_t* grid,
                       int32_t& r, int32_t& c, int64_t& mold) {
  // The walk starts at word 2 (even), so its words go in pairs, the low and high halves of one
  // draw (an odd start, never used by generate_maze, takes its first word alone).
  uint64_t s = 0;
  uint64_t x = g + ((counter >> 1) + 1) * GOLDEN;
  if ((counter & 1) && L > 0) {
    walk_step(static_cast<uint32_t>(mix64(x) >> 32), n, S, grid, r, c, mold);
    x += GOLDEN;
    s = 1;
  }
  for (; s + 2 <= L; s += 2) {
    const uint64_t h = mix64(x);
    x += GOLDEN;
    walk_step(static_cast<uint32_t>(h), n, S, grid, r, c, mold);
    walk_step(static_cast<uint32_t>(h >> 32), n, S, grid, r, c, mold);
  }
  if (s < L) walk_step(static_cast<uint32_t>(mix64(x)), n, S, grid, r, c, mold);
}

// The generator's policy: the selection-sampling routine (operator()) and the walk (walk())
// generate_maze() uses. The CPU backend substitutes SIMD versions (cpu_sampler.cpp) that must give
// bitwise the same grid, position, Mold count and word counter; the tests compare them.
#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))
#define WS_FIXED_TILE_SAMPLER 1
// Host builds give the generator's two passes their own out-of-line copies with the tiles as
// constants. Measured (size 100, portable, CPU time): inlined into generate_maze() 28 us per maze
// (GCC spilled the loop's state onto the serial chain), out of line with run-time tiles 26.6, out
// of line with constant tiles 23.3.
template <uint8_t From, uint8_t To>
__attribute__((noinline, flatten)) void selection_sample_fixed(uint8_t* grid, int32_t size,
                                                              int32_t n, int64_t need,
                                                              int64_t remaining, uint64_t key,
                                                              uint64_t& counter) {
  selection_sample(grid, size, n, From, To, need, remaining, key, counter);
}
#endif

struct DefaultSampler {
  WS_HD void walk(uint64_t g, uint64_t counter, uint64_t L, int32_t n, int32_t S, uint8_t* grid,
                  int32_t& r, int32_t& c, int64_t& mold) const {
    random_walk(g, counter, L, n, S, grid, r, c, mold);
  }
  WS_HD void operator()(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to,
                        int64_t need, int64_t remaining, uint64_t key, uint64_t& counter) const {
#if defined(WS_FIXED_TILE_SAMPLER)
    if (from == MOLD && to == PATH)
      return selection_sample_fixed<MOLD, PATH>(grid, size, n, need, remaining, key, counter);
    if (from == PATH && to == GOLD)
      return selection_sample_fixed<PATH, GOLD>(grid, size, n, need, remaining, key, counter);
#endif
    selection_sample(grid, size, n, from, to, need, remaining, key, counter);
  }
};

// Generates the maze of `key` (an episode key) into grid [S*S]; writes the start cell.
template <typename Sampler = DefaultSampler>
WS_HD void generate_maze(const Config& cfg, uint64_t key, uint8_t* grid, const int32_t* bfs_order,
                         int32_t& out_row, int32_t& out_col, const Sampler& sample = Sampler()) {
  const int32_t S = cfg.size, n = cfg.n;
  const int64_t I = cfg.interior;
  const uint64_t g = gen_key(key);
  // 1. all Mold
  for (int64_t i = 0; i < static_cast<int64_t>(S) * S; ++i) grid[i] = MOLD;
  WordStream words(g, 0);
  // 2. start of the walk
  const int64_t start = uniform_word(words.next(), static_cast<uint64_t>(I));
  int32_t r = 1 + static_cast<int32_t>(start / n), c = 1 + static_cast<int32_t>(start % n);
  int64_t mold = I;  // interior Mold count, kept as the walk carves (saves a counting pass)
  {
    uint8_t& cell = grid[static_cast<int64_t>(r) * S + c];
    mold -= (cell == MOLD);
    cell = PATH;
  }
  // 3. walk length
  const uint64_t lmin = static_cast<uint64_t>(cfg.walk_min_mult) * n;
  const uint64_t lspan = static_cast<uint64_t>(cfg.walk_max_mult) * n - lmin + 1;
  const uint64_t L = lmin + uniform_word(words.next(), lspan);
  // 4. the walk (n == 1: no interior neighbours, no draws)
  uint64_t counter = words.index;
  if (n > 1) {
    sample.walk(g, counter, L, n, S, grid, r, c, mold);
    counter += L;
  }
  // 5. too much Mold: flip down to a uniform target in [lo, hi]
  if (mold > cfg.mold_hi) {
    const int64_t target =
        cfg.mold_lo + gen_uniform(g, counter++, static_cast<uint64_t>(cfg.mold_hi - cfg.mold_lo + 1));
    sample(grid, S, n, MOLD, PATH, mold - target, mold, g, counter);
    mold = target;
  }
  // 6. Gold on interior Path cells
  const int64_t P = I - mold;
  int64_t G = static_cast<int64_t>(cfg.gold_ratio * static_cast<double>(mold));
  if (G < 1) G = 1;
  if (G > P) G = P;
  sample(grid, S, n, PATH, GOLD, G, P, g, counter);
  // 7. start: first Path cell in BFS order from the centre (validation guarantees one exists)
  const int64_t cells = static_cast<int64_t>(S) * S;
  for (int64_t j = 0; j < cells; ++j) {
    const int32_t idx = bfs_order[j];
    if (grid[idx] == PATH) {
      out_row = idx / S;
      out_col = idx % S;
      return;
    }
  }
  out_row = S / 2;  // unreachable for a validated config
  out_col = S / 2;
}

// Moves env i to its next episode index (wrapping like the int64 tensor it is: INT64_MAX + 1 as
// int64 is UB, and episode_key() takes the index modulo 2^64).
WS_HD void advance_episode(const StateView& s, int64_t i) {
  s.episode[i] = static_cast<int64_t>(static_cast<uint64_t>(s.episode[i]) + 1);
}

// Resets env i to episode index state.episode[i] (spec "Episode", reset).
template <typename Sampler = DefaultSampler>
WS_HD void reset_one_env(const Config& cfg, const StateView& s, int64_t i,
                         const int32_t* bfs_order, const Sampler& sample = Sampler()) {
  const int64_t S2 = static_cast<int64_t>(cfg.size) * cfg.size;
  const uint64_t key =
      episode_key(cfg.seed, static_cast<uint64_t>(i), static_cast<uint64_t>(s.episode[i]));
  int32_t r, c;
  generate_maze(cfg, key, s.grid + i * S2, bfs_order, r, c, sample);
  s.row[i] = r;
  s.col[i] = c;
  s.t[i] = 0;
  s.wind_from[i] = -1;
  s.done[i] = 0;
  s.step_key[i] = step_key_of(key);
  s.origin_env[i] = i;
  s.origin_episode[i] = s.episode[i];
}

// ---- stepping (spec "Episode", step) ------------------------------------------------------------
WS_HD bool inside(int32_t size, int32_t r, int32_t c) {
  return r >= 0 && r < size && c >= 0 && c < size;
}

// Why env i cannot take `action`; 0 if it can. Used by both backends' validation passes (which run
// before any mutation, so a rejected call changes nothing).
enum StepError : int32_t {
  STEP_OK = 0,
  STEP_BAD_ACTION = 1,    // not in 0..3
  STEP_LEAVES_GRID = 2,   // the neighbour is outside the grid
  STEP_DONE = 3,          // the episode is over (reset it; autoreset never leaves one done)
  STEP_BAD_STATE = 4,     // position/t outside their ranges: the state buffers are corrupt
};
WS_HD int32_t step_error(const Config& cfg, const StateView& s, int64_t i, int32_t action) {
  const int32_t r = s.row[i], c = s.col[i], t = s.t[i];
  if (r < 0 || r >= cfg.size || c < 0 || c >= cfg.size || t < 0 || t > cfg.episode_steps)
    return STEP_BAD_STATE;
  if (s.done[i]) return STEP_DONE;
  if (t >= cfg.episode_steps) return STEP_BAD_STATE;
  if (action < 0 || action > 3) return STEP_BAD_ACTION;
  if (!inside(cfg.size, r + dir_drow(action), c + dir_dcol(action))) return STEP_LEAVES_GRID;
  return STEP_OK;
}

// Leaves the current cell (melting) and enters (r, c); returns the entered tile, adds its reward.
WS_HD int32_t move_to(const Config& cfg, uint8_t* grid, int32_t& row, int32_t& col, int32_t r,
                      int32_t c, float& reward) {
  const int32_t S = cfg.size;
  if (cfg.melting) grid[row * S + col] = MOLD;
  uint8_t& cell = grid[r * S + c];
  const int32_t tile = cell;
  if (tile == MOLD) {
    reward += cfg.mold_reward;
  } else if (tile == GOLD) {
    reward += cfg.gold_reward;
    cell = PATH;  // consumed
  }
  row = r;
  col = c;
  return tile;
}

// One validated step of env i; writes the step's outputs at index i. Autoreset is the caller's.
WS_HD void step_one_env(const Config& cfg, const StateView& s, int64_t i, int32_t action,
                        const StepOut& out) {
  const int64_t S2 = static_cast<int64_t>(cfg.size) * cfg.size;
  uint8_t* grid = s.grid + i * S2;
  int32_t row = s.row[i], col = s.col[i];
  const int32_t t = s.t[i];
  const uint64_t key = s.step_key[i];
  float reward = cfg.step_reward;
  const int32_t entered =
      move_to(cfg, grid, row, col, row + dir_drow(action), col + dir_dcol(action), reward);
  int32_t pushed = -1, wind = -1;
  const uint64_t base = static_cast<uint64_t>(t) * 4;
  if (bernoulli(key, base + 0, cfg.wind_threshold)) {
    const int32_t from = static_cast<int32_t>(uniform(key, base + 1, 4));
    const int32_t to = opposite(from);
    const int32_t nr = row + dir_drow(to), nc = col + dir_dcol(to);
    if (inside(cfg.size, nr, nc)) {
      pushed = move_to(cfg, grid, row, col, nr, nc, reward);
      wind = from;
    }
  }
  const int32_t nt = t + 1;
  const uint8_t done = nt == cfg.episode_steps;
  s.row[i] = row;
  s.col[i] = col;
  s.t[i] = nt;
  s.wind_from[i] = wind;
  s.done[i] = done;
  out.reward[i] = reward;
  out.tile_entered[i] = entered;
  out.tile_pushed[i] = pushed;
  out.wind_from[i] = wind;
  out.done[i] = done;
}

// Step plus same-step autoreset (spec "Autoreset").
template <typename Sampler = DefaultSampler>
WS_HD void step_and_autoreset(const Config& cfg, const StateView& s, int64_t i, int32_t action,
                              const StepOut& out, const int32_t* bfs_order,
                              const Sampler& sample = Sampler()) {
  step_one_env(cfg, s, i, action, out);
  if (cfg.autoreset && s.done[i]) {
    advance_episode(s, i);
    reset_one_env(cfg, s, i, bfs_order, sample);
  }
}

// ---- clone (spec "Clone") -----------------------------------------------------------------------
// Everything but the grid (the CUDA backend copies grids with a whole block, the CPU in
// clone_one_env below).
WS_HD void clone_scalars(const StateView& s, int64_t src, int64_t dst, bool independent) {
  s.row[dst] = s.row[src];
  s.col[dst] = s.col[src];
  s.t[dst] = s.t[src];
  s.wind_from[dst] = s.wind_from[src];
  s.done[dst] = s.done[src];
  s.episode[dst] = s.episode[src];
  s.origin_env[dst] = s.origin_env[src];
  s.origin_episode[dst] = s.origin_episode[src];
  s.step_key[dst] =
      independent ? clone_key(s.step_key[src], static_cast<uint64_t>(dst)) : s.step_key[src];
}

WS_HD void clone_one_env(const Config& cfg, const StateView& s, int64_t src, int64_t dst,
                         bool independent) {
  const int64_t S2 = static_cast<int64_t>(cfg.size) * cfg.size;
  const uint8_t* from = s.grid + src * S2;
  uint8_t* to = s.grid + dst * S2;
  for (int64_t j = 0; j < S2; ++j) to[j] = from[j];
  clone_scalars(s, src, dst, independent);
}

// ---- observation --------------------------------------------------------------------------------
// The listed directions of the prompt before move t, in prompt order; returns their count.
// Lehmer code of uniform(step_key, 4t+2, 24) over [N, E, S, W], invalid directions dropped.
WS_HD int32_t prompt_order(const Config& cfg, int32_t row, int32_t col, int32_t t, uint64_t key,
                           int32_t order[4]) {
  int32_t perm[4] = {NORTH, EAST, SOUTH, WEST};
  if (cfg.shuffle_directions) {
    const uint32_t r = uniform(key, static_cast<uint64_t>(t) * 4 + 2, 24);
    const uint32_t picks[3] = {r / 6, (r % 6) / 2, r % 2};
    int32_t rest[4] = {NORTH, EAST, SOUTH, WEST};
    int32_t left = 4;
    for (int k = 0; k < 3; ++k) {
      const uint32_t p = picks[k];
      perm[k] = rest[p];
      for (int32_t j = static_cast<int32_t>(p); j + 1 < left; ++j) rest[j] = rest[j + 1];
      --left;
    }
    perm[3] = rest[0];
  }
  int32_t count = 0;
  for (int k = 0; k < 4; ++k) {
    const int32_t d = perm[k];
    if (inside(cfg.size, row + dir_drow(d), col + dir_dcol(d))) order[count++] = d;
  }
  for (int k = count; k < 4; ++k) order[k] = -1;
  return count;
}

// neighbours[4]: tile code in N, E, S, W or -1 outside; order[4]: prompt order padded with -1.
// A position off the grid (a corrupt state buffer) lists no neighbour and no direction, like the
// oracle (and row/col +- 1 would overflow at INT32_MIN/MAX).
WS_HD void observe_one_env(const Config& cfg, const StateView& s, int64_t i, int32_t* neighbours,
                           int32_t* order) {
  const int32_t S = cfg.size;
  const uint8_t* grid = s.grid + i * static_cast<int64_t>(S) * S;
  const int32_t row = s.row[i], col = s.col[i];
  if (!inside(S, row, col)) {
    for (int d = 0; d < 4; ++d) neighbours[d] = order[d] = -1;
    return;
  }
  for (int d = 0; d < 4; ++d) {
    const int32_t r = row + dir_drow(d), c = col + dir_dcol(d);
    neighbours[d] = inside(S, r, c) ? static_cast<int32_t>(grid[r * S + c]) : -1;
  }
  prompt_order(cfg, row, col, s.t[i], s.step_key[i], order);
}

// observe_one_env plus ObserveOut's optional outputs, at env i's rows of each buffer.
WS_HD void observe_one_env(const Config& cfg, const StateView& s, int64_t i, const ObserveOut& out) {
  int32_t* neighbours = out.neighbours + 4 * i;
  observe_one_env(cfg, s, i, neighbours, out.order + 4 * i);
  if (out.valid)
    for (int d = 0; d < 4; ++d) out.valid[4 * i + d] = neighbours[d] >= 0;
  if (out.position) {
    out.position[2 * i] = s.col[i];
    out.position[2 * i + 1] = s.row[i];
  }
  if (out.step_index) out.step_index[i] = s.t[i];
  if (out.wind_from) out.wind_from[i] = s.wind_from[i];
}

// ---- token rendering ----------------------------------------------------------------------------
// Returned by turn_fragments / render_one_env_tokens when env i's position is off the grid or a
// listed neighbour holds no tile code: the fragment indices would fall outside the table, so a
// corrupt state buffer is reported (both backends raise) instead of read out of bounds.
constexpr int32_t RENDER_BAD_STATE = -1;

// The fragment sequence of env i's user turn; returns the count (<= MAX_TURN_FRAGMENTS), or
// RENDER_BAD_STATE (nothing meaningful in frags).
WS_HD int32_t turn_fragments(const Config& cfg, const StateView& s, int64_t i, int32_t* frags) {
  const int32_t S = cfg.size;
  const uint8_t* grid = s.grid + i * static_cast<int64_t>(S) * S;
  const int32_t row = s.row[i], col = s.col[i], wind = s.wind_from[i];
  if (!inside(S, row, col)) return RENDER_BAD_STATE;
  int32_t k = 0;
  frags[k++] = FRAG_TURN_PREFIX;
  if (wind >= 0 && wind < 4) {
    frags[k++] = FRAG_WIND + wind;
    frags[k++] = FRAG_HEAD_AFTER_WIND;
  } else {
    frags[k++] = FRAG_HEAD_PLAIN;
  }
  frags[k++] = FRAG_XNUM + col;
  frags[k++] = FRAG_XNUM + S + row;
  frags[k++] = FRAG_CLOSE;
  int32_t order[4];
  const int32_t count = prompt_order(cfg, row, col, s.t[i], s.step_key[i], order);
  for (int32_t j = 0; j < count; ++j) {
    const int32_t d = order[j];
    const int32_t tile = grid[(row + dir_drow(d)) * S + (col + dir_dcol(d))];
    if (tile > GOLD) return RENDER_BAD_STATE;
    frags[k++] = FRAG_CLAUSE + ((d * 3 + tile) * 2 + (j == 0)) * 2 + (j == count - 1);
  }
  frags[k++] = FRAG_TAIL;
  frags[k++] = FRAG_TURN_SUFFIX;
  return k;
}

WS_HD int32_t fragments_length(const TokenTable& tt, const int32_t* frags, int32_t nf) {
  int32_t len = 0;
  for (int32_t j = 0; j < nf; ++j) len += tt.offsets[frags[j] + 1] - tt.offsets[frags[j]];
  return len;
}

// Writes env i's turn into out[max_len] padded with pad_id; returns its length. If it does not fit
// nothing is written and the (too large) length is returned; for a corrupt state nothing is
// written and RENDER_BAD_STATE is returned: callers check both.
WS_HD int32_t render_one_env_tokens(const Config& cfg, const StateView& s, int64_t i,
                                    const TokenTable& tt, int32_t* out) {
  int32_t frags[MAX_TURN_FRAGMENTS];
  const int32_t nf = turn_fragments(cfg, s, i, frags);
  if (nf < 0) return RENDER_BAD_STATE;
  const int32_t len = fragments_length(tt, frags, nf);
  if (len > tt.max_len) return len;
  int32_t k = 0;
  for (int32_t j = 0; j < nf; ++j) {
    const int32_t b = tt.offsets[frags[j]], e = tt.offsets[frags[j] + 1];
    for (int32_t p = b; p < e; ++p) out[k++] = tt.ids[p];
  }
  for (; k < tt.max_len; ++k) out[k] = tt.pad_id;
  return len;
}

// ---- oracle -------------------------------------------------------------------------------------
// Scratch per env: dist int32[S*S] (-1 = unvisited), queue int32[S*S], mask uint8[S*S].
WS_HD size_t oracle_scratch_bytes_per_env(int32_t size) {
  const size_t cells = static_cast<size_t>(size) * size;
  return (cells * 9 + 15) / 16 * 16;  // 16-byte aligned chunks per env
}

// BFS from the agent through non-Mold cells to the nearest Gold. Writes dist (moves, -1 if none)
// and optimal[4] (1 per valid first move of some shortest path; with no Gold reachable, the valid
// moves onto non-Mold cells, else every valid move: welfare_server/maze/reference.py, oracle()).
// `dist` must hold -1 in every cell on entry and is restored to -1 on return, so a scratch region
// is initialised once and reused (the CPU keeps it per thread; CUDA clears it once per call).
// A position off the grid (a corrupt state buffer) gives dist -1 and no optimal move (a real
// position always has at least two valid moves) and touches no scratch.
WS_HD void oracle_one_env(const Config& cfg, const StateView& s, int64_t i, int32_t* dist_out,
                          uint8_t* optimal, int32_t* dist, int32_t* queue, uint8_t* mask) {
  const int32_t S = cfg.size;
  const uint8_t* grid = s.grid + i * static_cast<int64_t>(S) * S;
  const int32_t row = s.row[i], col = s.col[i];
  if (!inside(S, row, col)) {
    *dist_out = -1;
    for (int d = 0; d < 4; ++d) optimal[d] = 0;
    return;
  }
  const int32_t start = row * S + col;
  int32_t head = 0, tail = 0;
  dist[start] = 0;
  mask[start] = 0;
  queue[tail++] = start;
  int32_t found = -1;
  while (head < tail) {
    const int32_t u = queue[head++];
    const int32_t du = dist[u];
    if (found >= 0 && du >= found) break;
    const int32_t ur = u / S, uc = u % S;
    for (int d = 0; d < 4; ++d) {
      const int32_t r = ur + dir_drow(d), c = uc + dir_dcol(d);
      if (!inside(S, r, c)) continue;
      const int32_t v = r * S + c;
      const uint8_t tile = grid[v];
      if (tile == MOLD) continue;
      const uint8_t m = (u == start) ? static_cast<uint8_t>(1u << d) : mask[u];
      if (dist[v] < 0) {
        dist[v] = du + 1;
        mask[v] = m;
        queue[tail++] = v;
        if (tile == GOLD && found < 0) found = du + 1;
      } else if (dist[v] == du + 1) {
        mask[v] |= m;
      }
    }
  }
  uint8_t best = 0;
  if (found >= 0) {
    for (int32_t j = 0; j < tail; ++j) {
      const int32_t v = queue[j];
      if (dist[v] == found && grid[v] == GOLD) best |= mask[v];
    }
  }
  for (int32_t j = 0; j < tail; ++j) dist[queue[j]] = -1;  // restore the scratch invariant
  *dist_out = found;
  uint8_t valid = 0, open = 0;
  for (int d = 0; d < 4; ++d) {
    const int32_t r = row + dir_drow(d), c = col + dir_dcol(d);
    if (!inside(S, r, c)) continue;
    valid |= 1u << d;
    if (grid[r * S + c] != MOLD) open |= 1u << d;
  }
  const uint8_t pick = found >= 0 ? best : (open ? open : valid);
  for (int d = 0; d < 4; ++d) optimal[d] = (pick >> d) & 1u;
}

}  // namespace ws
