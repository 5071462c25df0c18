// The best kc of one row of reserve tokens on CPUs (declared in cpu_top.h): three passes over the row (the group's
// maximum with the finite scores' range, a histogram that finds the bin of the kc-th best, the keys of the
// scores that can reach it), then a partial sort of those few. The passes run as AVX-512 loops where the CPU
// has them (cpu_scores.h's level) and as loops the compiler vectorizes elsewhere; both give the same keys.
#include "cpu_top.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>

#include "cpu_scores.h"

#if defined(__x86_64__) && !defined(_MSC_VER)
#include <immintrin.h>
#define SLAM_X86 1
#endif

// The scalar passes are built for several x86 levels, the best the CPU runs chosen at load time (the extension is
// built without -march flags, so that an image built on one machine runs on another).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SLAM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SLAM_CLONES
#endif

namespace slam_top {
namespace {

constexpr float kNone = -std::numeric_limits<float>::infinity();
constexpr int64_t kBins = 1024;

// A float's bits as an unsigned integer in the float's order (-0.0 taken as 0.0, as comparisons take it).
inline uint32_t ordered_bits(float f) {
  if (f == 0.0f) f = 0.0f;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ordered_bits back to the float (-0.0 comes back as 0.0, which compares equal).
inline float from_ordered_bits(uint32_t u) {
  u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// One integer orders the picks and says what they are: the score's bits made monotonic (high word), then the
// lower tie key first (low word), so that no position needs to travel with it.
inline uint64_t pick_key(float s, int64_t tie) {
  return (uint64_t(ordered_bits(s)) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(tie));
}

// The finite scores' range and count. A NaN (never stored, only a row with nothing stored gives one) counts as
// not finite, as -inf does.
struct Range {
  float lo = std::numeric_limits<float>::infinity(), hi = kNone;
  int64_t finite = 0;
};

// Pass one over tokens [from, m): s = the group's maximum, -inf where not stored, into r.
SLAM_CLONES void scores_scalar(const float* x, int64_t g, int64_t m, const bool* ok, float* s, int64_t from,
                               Range& r) {
  for (int64_t i = from; i < m; ++i) s[i] = x[i];
  for (int64_t j = 1; j < g; ++j)  // query by query: contiguous, vectorizable
    for (int64_t i = from; i < m; ++i) s[i] = std::max(s[i], x[j * m + i]);
  for (int64_t i = from; i < m; ++i) {
    const float v = ok[i] ? s[i] : kNone;
    const bool f = v > kNone;
    s[i] = v;
    r.lo = std::min(r.lo, f ? v : r.lo);
    r.hi = std::max(r.hi, v);
    r.finite += f;
  }
}

// Pass two over [from, m): each score's bin of [lo, lo + kBins / inv), -1 where not stored; NaN and overflow go to
// the ends.
SLAM_CLONES void bins_scalar(const float* s, int64_t m, float lo, float inv, int16_t* bins, int64_t from) {
  for (int64_t i = from; i < m; ++i) {
    const float v = (s[i] - lo) * inv;
    const int16_t in = v >= 0.0f ? (v < kBins ? static_cast<int16_t>(v) : int16_t(kBins - 1)) : int16_t(0);
    bins[i] = s[i] > kNone ? in : int16_t(-1);
  }
}

// Pass three over [from, m): the keys of tokens whose bin is at least cut (every token when bins is nullptr),
// appended at pick; returns how many.
SLAM_CLONES int64_t keys_scalar(const float* s, int64_t m, const int16_t* bins, int64_t cut, const int64_t* tie,
                                uint64_t* pick, int64_t from) {
  int64_t n = 0;
  for (int64_t i = from; i < m; ++i)
    if (!bins || bins[i] >= cut) pick[n++] = pick_key(s[i], tie ? tie[i] : i);
  return n;
}

#ifdef SLAM_X86
// The three passes in AVX-512, sixteen tokens (eight keys) a step, the tail by the scalar loops. Each lane does
// what the scalar loop does to its token: the maxima and minima pick the same operand on ties and NaN (MAXPS and
// MINPS return their second operand then), and the bins and keys are computed by the same operations.
__attribute__((target("avx512f"))) void scores_avx512(const float* x, int64_t g, int64_t m, const bool* ok, float* s,
                                                      Range& r) {
  const __m512 none = _mm512_set1_ps(kNone);
  __m512 lo = _mm512_set1_ps(r.lo), hi = _mm512_set1_ps(r.hi);
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    for (int64_t j = 1; j < g; ++j) v = _mm512_max_ps(_mm512_loadu_ps(x + j * m + i), v);
    const __m512i stored = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ok + i)));
    v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(stored, stored), none, v);
    const __mmask16 f = _mm512_cmp_ps_mask(v, none, _CMP_GT_OQ);
    _mm512_storeu_ps(s + i, v);
    lo = _mm512_mask_min_ps(lo, f, v, lo);
    hi = _mm512_max_ps(v, hi);
    r.finite += __builtin_popcount(f);
  }
  r.lo = _mm512_reduce_min_ps(lo), r.hi = _mm512_reduce_max_ps(hi);  // exact: the order of a minimum is free
  scores_scalar(x, g, m, ok, s, i, r);
}

__attribute__((target("avx512f"))) void bins_avx512(const float* s, int64_t m, float lo, float inv, int16_t* bins) {
  const __m512 vlo = _mm512_set1_ps(lo), vinv = _mm512_set1_ps(inv), none = _mm512_set1_ps(kNone);
  const __m512 top = _mm512_set1_ps(float(kBins)), zero = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= m; i += 16) {
    const __m512 x = _mm512_loadu_ps(s + i);
    const __m512 v = _mm512_mul_ps(_mm512_sub_ps(x, vlo), vinv);
    const __m512i in = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, top, _CMP_LT_OQ), _mm512_set1_epi32(kBins - 1),
                                               _mm512_cvttps_epi32(v));
    __m512i b = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ), in);
    b = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, none, _CMP_GT_OQ), _mm512_set1_epi32(-1), b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bins + i), _mm512_cvtepi32_epi16(b));
  }
  bins_scalar(s, m, lo, inv, bins, i);
}

__attribute__((target("avx512f"))) int64_t keys_avx512(const float* s, int64_t m, const int16_t* bins, int64_t cut,
                                                       const int64_t* tie, uint64_t* pick) {
  const __m512i sign = _mm512_set1_epi32(int32_t(0x80000000u)), low = _mm512_set1_epi64(0xFFFFFFFFll);
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), vcut = _mm512_set1_epi32(int32_t(cut));
  int64_t i = 0, n = 0;
  for (; i + 16 <= m; i += 16) {
    const __m512 x = _mm512_loadu_ps(s + i);
    // ordered_bits: -0.0 as 0.0, then the sign flipped for positives and every bit for negatives.
    const __m512i u = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NEQ_UQ),
                                             _mm512_castps_si512(x));
    const __m512i ob = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
    const __mmask16 take = bins ? _mm512_cmpge_epi32_mask(_mm512_cvtepi16_epi32(_mm256_loadu_si256(
                                                              reinterpret_cast<const __m256i*>(bins + i))), vcut)
                                : __mmask16(0xFFFF);
    for (int half = 0; half < 2; ++half) {
      const __mmask8 k = __mmask8(take >> (8 * half));
      if (!k) continue;
      const __m512i t = tie ? _mm512_loadu_si512(tie + i + 8 * half) : _mm512_add_epi64(_mm512_set1_epi64(i + 8 * half), lanes);
      const __m512i hiw = _mm512_slli_epi64(_mm512_cvtepu32_epi64(half ? _mm512_extracti64x4_epi64(ob, 1)
                                                                         : _mm512_castsi512_si256(ob)), 32);
      const __m512i key = _mm512_or_si512(hiw, _mm512_sub_epi64(low, _mm512_and_si512(t, low)));
      _mm512_storeu_si512(pick + n, _mm512_maskz_compress_epi64(k, key));  // pick has eight spare keys
      n += __builtin_popcount(k);
    }
  }
  return n + keys_scalar(s, m, bins, cut, tie, pick + n, i);
}
#endif

}  // namespace

void top_row(const float* x, int64_t g, int64_t m, const bool* ok, const int64_t* tie, int64_t kc, int64_t* idx,
             float* score, Scratch& w) {
  if (kc == 0) return;
#ifdef SLAM_X86
  const bool wide = slam_scores::vector_level() == 2;
#else
  const bool wide = false;
#endif
  w.s.resize(m);
  float* s = w.s.data();
  Range r;
#ifdef SLAM_X86
  if (wide) scores_avx512(x, g, m, ok, s, r);
  else
#endif
    scores_scalar(x, g, m, ok, s, 0, r);
  // Only scores that can reach the kc best are keyed. A histogram of the finite scores over their range finds the
  // bin holding the kc-th best: every score of a higher bin is strictly higher than every score of a lower one,
  // since the bin is monotonic in the score.
  const float inv = kBins / (r.hi - r.lo);
  const bool binned = r.finite > kc && r.hi > r.lo;
  int64_t cut = 0;
  if (binned) {
    w.bins.resize(m);
#ifdef SLAM_X86
    if (wide) bins_avx512(s, m, r.lo, inv, w.bins.data());
    else
#endif
      bins_scalar(s, m, r.lo, inv, w.bins.data(), 0);
    w.hist.assign(kBins + 1, 0);
    int32_t* hist = w.hist.data() + 1;  // hist[-1] counts the empty ones
    for (int64_t i = 0; i < m; ++i) ++hist[w.bins[i]];
    for (int64_t total = 0, b = kBins - 1; b >= 0; --b)
      if ((total += hist[b]) >= kc) {
        cut = b;
        break;
      }
  }
  w.pick.resize(m + 8);
  const int16_t* bins = binned ? w.bins.data() : nullptr;
#ifdef SLAM_X86
  const int64_t n = wide ? keys_avx512(s, m, bins, cut, tie, w.pick.data())
                         : keys_scalar(s, m, bins, cut, tie, w.pick.data(), 0);
#else
  const int64_t n = keys_scalar(s, m, bins, cut, tie, w.pick.data(), 0);
#endif
  const auto first = w.pick.begin(), last = first + n;
  std::nth_element(first, first + (kc - 1), last, std::greater<uint64_t>());
  std::sort(first, first + kc, std::greater<uint64_t>());
  for (int64_t j = 0; j < kc; ++j) {
    idx[j] = int64_t(0xFFFFFFFFu - uint32_t(w.pick[j]));
    score[j] = from_ordered_bits(uint32_t(w.pick[j] >> 32));
  }
}

}  // namespace slam_top
