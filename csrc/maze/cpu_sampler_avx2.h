// The AVX2 generator routines of the CPU backend (included by cpu_sampler.cpp only; x86-64 GCC or
// Clang). Compiled for AVX2 through function attributes, so the library still runs on any x86-64:
// cpu_sampler.cpp calls these only when the CPU reports AVX2, BMI1 and POPCNT.
//
// AVX2 has no 64-bit vector multiply (mix64 is built from 32-bit ones), and the CPUs with AVX2 but
// no AVX-512 include AMD Zen 1/2, where pdep is microcoded and slow: unlike the AVX-512 sampler,
// this one never deposits bits with pdep.
//
// Measured on the 2-core AMD EPYC (Zen 2, AVX2, no AVX-512) dev VM, size 100, one thread, CPU
// time, min of 7 runs of 4000 mazes: a maze takes ~42-45 us with the portable routines and ~20-21
// with these (the VM's speed drifts by ~8% with its neighbours' load, so the ratio is the stable
// figure: 2.1x). Breakdown: walk ~2.5 us, the two selection passes ~18. Blocks across row ends
// (64 consecutive cells, border bits cleared) then took the passes from 196 blocks to 154 each:
// 19.8 -> 19.0 us per maze (ws_bench_maze, same VM, back to back).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "rules.h"

namespace ws {
namespace avx2 {

#define WS_AVX2_TARGET __attribute__((target("avx2,bmi,popcnt")))

// For an 8-bit mask m of candidate cells: bit[m][l] = 1 << (number of candidates before lane l)
// for a candidate lane, 0 for the others. A lane tests that bit of the selection bits taken from
// its group's first candidate on: the cell-order deposit of candidate-order selections (what pdep
// would do).
struct BitTables {
  alignas(64) uint8_t bit[256][8];
  constexpr BitTables() : bit{} {
    for (int m = 0; m < 256; ++m) {
      int before = 0;
      for (int l = 0; l < 8; ++l) {
        const bool cand = (m >> l) & 1;
        bit[m][l] = cand ? static_cast<uint8_t>(1u << before) : 0;
        before += cand;
      }
    }
  }
};
constexpr BitTables kBits{};

// z * c mod 2^64 per 64-bit lane from 32-bit multiplies: lo(z) lo(c) + ((lo(z) hi(c) + hi(z) lo(c))
// << 32), both cross terms from one vpmulld against c with its halves swapped (cswap). (Three
// vpmuludq with dword shuffles in place of the shifts, since Zen 2 issues vector shifts on one
// pipe, measured slower: 24.4 vs 23.3 us per maze.)
WS_AVX2_TARGET inline __m256i mul64(__m256i z, __m256i c, __m256i cswap) {
  const __m256i lo = _mm256_mul_epu32(z, c);
  const __m256i t = _mm256_mullo_epi32(z, cswap);
  const __m256i s = _mm256_add_epi32(t, _mm256_srli_epi64(t, 32));
  return _mm256_add_epi64(lo, _mm256_slli_epi64(s, 32));
}

// rules.h's mix64 of 4 lanes.
WS_AVX2_TARGET inline __m256i mix64x4(__m256i z) {
  const __m256i c1 = _mm256_set1_epi64x(static_cast<long long>(0xBF58476D1CE4E5B9ull));
  const __m256i c1s = _mm256_set1_epi64x(static_cast<long long>(0x1CE4E5B9BF58476Dull));
  const __m256i c2 = _mm256_set1_epi64x(static_cast<long long>(0x94D049BB133111EBull));
  const __m256i c2s = _mm256_set1_epi64x(static_cast<long long>(0x133111EB94D049BBull));
  z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 30));
  z = mul64(z, c1, c1s);
  z = _mm256_xor_si256(z, _mm256_srli_epi64(z, 27));
  z = mul64(z, c2, c2s);
  return _mm256_xor_si256(z, _mm256_srli_epi64(z, 31));
}

// Words 2 * first_draw .. 2 * first_draw + 8 * count - 1 of key's stream into out: draws stored as
// little-endian 64-bit values are the word stream itself (low half first, spec "RNG").
WS_AVX2_TARGET inline void hash_words(uint32_t* out, uint64_t key, uint64_t first_draw, int count) {
  __m256i x = _mm256_add_epi64(
      _mm256_set1_epi64x(static_cast<long long>(key + (first_draw + 1) * GOLDEN)),
      _mm256_setr_epi64x(0, static_cast<long long>(GOLDEN), static_cast<long long>(2 * GOLDEN),
                         static_cast<long long>(3 * GOLDEN)));
  const __m256i step = _mm256_set1_epi64x(static_cast<long long>(4 * GOLDEN));
  for (int i = 0; i < count; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * i), mix64x4(x));
    x = _mm256_add_epi64(x, step);
  }
}

// (a * b) >> 32 per 32-bit lane.
WS_AVX2_TARGET inline __m256i mulhi_epu32(__m256i a, __m256i b) {
  const __m256i pe = _mm256_mul_epu32(a, b);
  const __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  return _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}

// The words of one selection pass, hashed ahead of its decisions: a per-thread buffer that grows
// to the largest pass seen (4 bytes per interior cell).
inline uint32_t* pass_words(size_t count) {
  static thread_local std::vector<uint32_t> words;
  if (words.size() < count) words.resize(count);
  return words.data();
}

// Bit b of entry o: the cell o + b cells after a cell in column o is an interior column (not
// column 0 or size - 1), for o < size: the border bits a 64-cell block across row ends clears.
// Built once per size on each thread.
inline const uint64_t* interior_column_masks(int32_t size) {
  static thread_local std::vector<uint64_t> masks;
  static thread_local int32_t built_for = -1;
  if (built_for != size) {
    masks.assign(static_cast<size_t>(size), 0);
    for (int32_t o = 0; o < size; ++o)
      for (int32_t b = 0; b < 64; ++b) {
        const int32_t c = (o + b) % size;
        if (c != 0 && c != size - 1) masks[static_cast<size_t>(o)] |= uint64_t{1} << b;
      }
    built_for = size;
  }
  return masks.data();
}

// Algorithm S (rules.h's selection_sample), 64 consecutive cells per block. The block's candidates
// are decided in candidate order, 8 per vector, every one against the block's starting `need`: the
// candidate of rank j in the block is surely selected if u + j < need (at most j selections
// precede it) and surely rejected if u >= need; the few in between (probability j / remaining)
// are resolved in order from the exact count of selections before them. The selections are then
// spread to their cells 16 at a time (a bit table per 8-cell mask, no pdep). Words are hashed
// with 4-lane vector mix64s a block ahead of their use, so their stores have landed before the
// loads.
// Where the ~18 us of the two passes go (Zen 2 dev VM, size 100, ~16k decisions per maze), from
// variants with one part removed: hashing ~5 (16k words; a mix64 of 4 lanes is 6 multiply-pipe
// slots plus 7 shifts, each on a single pipe on Zen 2), the in-between candidates ~3 (~240 per
// maze, each a mispredicted branch and a serial resolution), the deposit ~2, the need chain ~2
// (~19 cycles per block: broadcast, compare, movemask, popcount), the rest ~6.
// Tried and slower there: 16- or 32-cell (or candidate) blocks, whose extra need chains cost more
// than the in-between candidates they save (25 and 24 us per maze against 22); deciding in cell
// order (vpermd of the words by a rank table, 8 cells per vector: 22 us); the multiply's shifts
// done as shuffles; resolving the first in-between candidate branch-free; preparing the next block
// before deciding this one; two mazes' passes interleaved block by block; a third of the draws on
// the scalar multiplier; hashing the passes' words during the walk.
WS_AVX2_TARGET inline void sample(uint8_t* grid, int32_t size, int32_t n, uint8_t from, uint8_t to,
                                  int64_t need, int64_t remaining, uint64_t key,
                                  uint64_t& counter) {
  if (need <= 0) return;
  constexpr uint64_t kLead = 128;                 // words hashed before the first block
  const uint64_t wbase = counter & ~uint64_t{1};  // buf[k] is word wbase + k
  const uint64_t wend = counter + static_cast<uint64_t>(remaining);
  // hashing stops below max(wend, wbase + kLead) + 64; a block's loads reach 63 words past its
  // first candidate's word
  uint32_t* buf = pass_words(static_cast<size_t>(wend - wbase) + kLead + 64 + 80);
  hash_words(buf, key, wbase >> 1, static_cast<int>(kLead / 8));
  uint64_t wtop = wbase + kLead;  // words [wbase, wtop) are in buf
  uint64_t w = counter;           // word of the next candidate
  // need <= remaining <= interior < 2^20 (MAX_SIZE 1000): 32-bit lanes and signed compares do
  uint32_t nd = static_cast<uint32_t>(need);
  uint32_t rem = static_cast<uint32_t>(remaining);
  const uint8_t* grid_end = grid + static_cast<int64_t>(size) * size;
  // Blocks are 64 consecutive grid cells from the first interior cell on, across row ends, with
  // the border columns' bits cleared: candidate order is still row-major over the interior, and
  // a size-100 pass takes ~154 blocks instead of 196 (two per row).
  uint8_t* const interior_end = grid + static_cast<int64_t>(n) * size + n + 1;  // one past (n, n)
  const uint64_t* border_free = interior_column_masks(size);
  const int32_t col_step = 64 % size;
  int32_t col = 1;  // (cells - grid) % size
  const __m256i vfrom = _mm256_set1_epi8(static_cast<char>(from));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  const __m128i diff = _mm_set1_epi8(static_cast<char>(from ^ to));
  const __m128i low_bytes = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, 8, 8);
  for (uint8_t* cells = grid + size + 1; cells < interior_end; cells += 64) {
    const int32_t len = interior_end - cells < 64 ? static_cast<int32_t>(interior_end - cells) : 64;
    uint64_t cand;
    if (cells + 64 <= grid_end) {  // the last block reads on into the bottom border
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cells));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cells + 32));
      cand = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(a, vfrom))) |
             (static_cast<uint64_t>(static_cast<uint32_t>(
                  _mm256_movemask_epi8(_mm256_cmpeq_epi8(b, vfrom)))) << 32);
      if (len < 64) cand &= (uint64_t{1} << len) - 1;
    } else {
      cand = match_mask(cells, len, from);
    }
    cand &= border_free[col];
    col += col_step;
    if (col >= size) col -= size;
    if (!cand) continue;
    if (wtop < wend) {  // keeps >= 127 words hashed ahead of w; a block uses <= 64
      hash_words(buf + (wtop - wbase), key, wtop >> 1, 8);
      wtop += 64;
    }
    const uint32_t* wp = buf + (w - wbase);
    const int p = __builtin_popcountll(cand);
    // lane l of vector q is the block's candidate j = 8q + l: u = uniform(rem - j)
    const __m256i ndv = _mm256_set1_epi32(static_cast<int>(nd));
    __m256i remv = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(rem)), lane);
    __m256i j = lane;
    uint64_t sure = 0, maybe = 0;
    for (int q = 0; q < (p + 7) >> 3; ++q) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 8 * q));
      const __m256i u = mulhi_epu32(words, remv);
      const __m256i sure_q = _mm256_cmpgt_epi32(ndv, _mm256_add_epi32(u, j));
      const __m256i maybe_q = _mm256_cmpgt_epi32(ndv, u);
      sure |= static_cast<uint64_t>(static_cast<uint32_t>(
                  _mm256_movemask_ps(_mm256_castsi256_ps(sure_q)))) << (8 * q);
      maybe |= static_cast<uint64_t>(static_cast<uint32_t>(
                   _mm256_movemask_ps(_mm256_castsi256_ps(maybe_q)))) << (8 * q);
      remv = _mm256_sub_epi32(remv, eight);
      j = _mm256_add_epi32(j, eight);
    }
    const uint64_t valid = p == 64 ? ~uint64_t{0} : (uint64_t{1} << p) - 1;
    uint64_t sel = sure & valid;
    uint64_t unsure = maybe & valid & ~sel;
    while (unsure) {
      const int i = __builtin_ctzll(unsure);
      unsure &= unsure - 1;
      const uint32_t before =
          static_cast<uint32_t>(__builtin_popcountll(sel & ((uint64_t{1} << i) - 1)));
      sel |= static_cast<uint64_t>(uniform_word(wp[i], rem - static_cast<uint32_t>(i)) + before <
                                   nd) << i;
    }
    // Deposit, 16 cells per step: each 8-cell half takes the selection bits from its first
    // candidate's rank on (byte 0 of sel >> rank, broadcast), and each candidate lane tests its
    // bit; selected cells get from ^ to xor-ed in.
    int first = 0;  // rank of the step's first candidate
    for (int g = 0; g < len; g += 16) {
      const uint32_t m0 = static_cast<uint32_t>(cand >> g) & 0xFF;
      const uint32_t m1 = static_cast<uint32_t>(cand >> (g + 8)) & 0xFF;
      const int mid = first + __builtin_popcount(m0);
      // (a rank of 64 has no candidate left to test: its bits are all 0, & 63 avoids the UB)
      const __m128i bits_of = _mm_shuffle_epi8(
          _mm_set_epi64x(static_cast<long long>(sel >> (mid & 63)),
                         static_cast<long long>(sel >> (first & 63))),
          low_bytes);
      const __m128i lane_bit = _mm_castpd_si128(_mm_loadh_pd(
          _mm_castsi128_pd(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kBits.bit[m0]))),
          reinterpret_cast<const double*>(kBits.bit[m1])));
      const __m128i flip = _mm_andnot_si128(
          _mm_cmpeq_epi8(_mm_and_si128(bits_of, lane_bit), _mm_setzero_si128()), diff);
      if (g + 16 <= len) {
        const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cells + g));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(cells + g), _mm_xor_si128(x, flip));
      } else {  // the row's last cells
        alignas(16) uint8_t f[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(f), flip);
        for (int k = 0; g + k < len; ++k) cells[g + k] ^= f[k];
      }
      first = mid + __builtin_popcount(m1);
    }
    nd -= static_cast<uint32_t>(__builtin_popcountll(sel));
    if (nd == 0) {  // the last selected candidate completes the sample: no further words
      counter = w + static_cast<uint64_t>(64 - __builtin_clzll(sel));
      return;
    }
    w += static_cast<uint32_t>(p);
    rem -= static_cast<uint32_t>(p);
  }
  counter = w;  // unreachable for need <= remaining: the sample completes above
}

// rules.h's random_walk with the words hashed in vectors ahead of the steps and the cells only
// written (no load of the cell, no running count); the interior Mold is counted afterwards, 32
// cells per compare. Zen 2 dev VM, size 100: 3.3 -> 2.5 us per maze (the walk's serial position
// chain leaves little room: hashing the passes' words in its loop saved ~0.15 us, not kept).
WS_AVX2_TARGET inline void walk(uint64_t g, uint64_t counter, uint64_t L, int32_t n, int32_t S,
                                uint8_t* grid, int32_t& r, int32_t& c, int64_t& mold) {
  constexpr uint64_t kChunk = 512;  // words per hashing round (2 KiB, stays in L1)
  alignas(32) uint32_t buf[kChunk + 8];
  int32_t row = r, col = c;
  for (uint64_t w = counter, end = counter + L; w < end;) {
    const uint64_t base = w & ~uint64_t{1};
    const uint64_t stop = end < base + kChunk ? end : base + kChunk;
    hash_words(buf, g, base >> 1, static_cast<int>((stop - base + 7) / 8));
    for (uint64_t k = w - base; k < stop - base; ++k) {
      walk_move(buf[k], n, row, col);
      grid[static_cast<int64_t>(row) * S + col] = PATH;
    }
    w = stop;
  }
  r = row;
  c = col;
  // rows 1..n in full, less their 2n border cells (always Mold)
  const uint8_t* p = grid + S;
  const int64_t bytes = static_cast<int64_t>(n) * S;
  const __m256i vmold = _mm256_set1_epi8(static_cast<char>(MOLD));
  int64_t count = 0, j = 0;
  for (; j + 32 <= bytes; j += 32)
    count += __builtin_popcount(static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + j)), vmold))));
  for (; j < bytes; ++j) count += p[j] == MOLD;
  mold = count - 2 * static_cast<int64_t>(n);
}

#undef WS_AVX2_TARGET

}  // namespace avx2
}  // namespace ws
