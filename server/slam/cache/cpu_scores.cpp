// Integer scoring of int8 keys on CPUs (declared in cpu_scores.h): AVX-512 where the CPU has it (with VNNI's
// fused multiply-add of int16 pairs where present), AVX2 on x86 CPUs without it, and scalar loops elsewhere;
// every path gives the same integers, hence the same logits.
#include "cpu_scores.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && !defined(_MSC_VER)
#include <immintrin.h>
#define SLAM_X86 1
#endif

namespace slam_scores {
namespace {
constexpr float kNone = -std::numeric_limits<float>::infinity();

// The vector paths, best last. The best the CPU runs is asked once; ATEN_CPU_CAPABILITY (torch's own setting:
// default, avx2, avx512) or set_level caps it, so that every path can be run and compared on one machine.
enum Level { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kNames[] = {"default", "avx2", "avx512"};
}  // namespace

// q [n, d] float32 -> int16 [n, d] and scales [n]: max |q| / 32767 per row (1e-30 at least), q / scale rounded
// half to even (torch.round).
void quantize_query(const float* q, int64_t n, int64_t d, int16_t* out, float* scale) {
  for (int64_t i = 0; i < n; ++i) {
    float amax = 0.0f;
    for (int64_t k = 0; k < d; ++k) amax = std::max(amax, std::fabs(q[i * d + k]));
    const float s = std::max(amax, 1e-30f) / 32767.0f;
    scale[i] = s;
    for (int64_t k = 0; k < d; ++k) out[i * d + k] = static_cast<int16_t>(std::nearbyint(q[i * d + k] / s));
  }
}

// dots[j][t] = sum_k q[j][k] * keys[t][k] for queries j < g ([g, d] int16) and keys t < m (rows of d int8,
// `stride` bytes apart) -> dots [g, ld].
static void int_dots_scalar(const int16_t* q, int64_t g, const int8_t* keys, int64_t stride, int64_t m, int64_t d,
                     int32_t* dots, int64_t ld) {
  for (int64_t t = 0; t < m; ++t)
    for (int64_t j = 0; j < g; ++j) {
      int32_t acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += int32_t(q[j * d + k]) * int32_t(keys[t * stride + k]);
      dots[j * ld + t] = acc;
    }
}

#ifdef SLAM_X86

// Eight vectors of int32 partial sums -> their eight totals (lane-wise additions, then across 128-bit lanes).
__attribute__((target("avx512f,avx512bw"))) static inline __m256i sum8(const __m512i* v) {
  __m512i p[4];
  for (int i = 0; i < 4; ++i)
    p[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  const __m512i r0 = _mm512_add_epi32(_mm512_unpacklo_epi64(p[0], p[1]), _mm512_unpackhi_epi64(p[0], p[1]));
  const __m512i r1 = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2], p[3]), _mm512_unpackhi_epi64(p[2], p[3]));
  const __m512i c = _mm512_add_epi32(_mm512_shuffle_i32x4(r0, r1, _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_i32x4(r0, r1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i e = _mm512_add_epi32(c, _mm512_shuffle_i32x4(c, c, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm256_set_m128i(_mm512_extracti32x4_epi32(e, 2), _mm512_castsi512_si128(e));
}

// int_dots_scalar for head_dim D: eight keys at a time, widened to int16 once for all the group's queries, whose
// products (pairs summed per int32 lane; vpdpwssd where the CPU has VNNI) reduce to eight totals per query.
template <int D, bool VNNI>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void int_dots_avx512(
    const int16_t* q, int64_t g, const int8_t* keys, int64_t stride, int64_t m, int32_t* dots, int64_t ld) {
  constexpr int P = D / 32;
  const int64_t m8 = m / 8 * 8;
  for (int64_t t = 0; t < m8; t += 8) {
    if (t + 40 <= m8)
      for (int i = 0; i < 8; ++i) _mm_prefetch(reinterpret_cast<const char*>(keys + (t + 32 + i) * stride), _MM_HINT_T0);
    __m512i kv[8][P];
    for (int i = 0; i < 8; ++i)
      for (int p = 0; p < P; ++p)
        kv[i][p] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + (t + i) * stride + 32 * p)));
    for (int64_t j = 0; j < g; ++j) {
      __m512i qv[P], acc[8];
      for (int p = 0; p < P; ++p) qv[p] = _mm512_loadu_si512(q + j * D + 32 * p);
      for (int i = 0; i < 8; ++i) {
        __m512i a = _mm512_setzero_si512();
        for (int p = 0; p < P; ++p)
          a = VNNI ? _mm512_dpwssd_epi32(a, kv[i][p], qv[p]) : _mm512_add_epi32(a, _mm512_madd_epi16(kv[i][p], qv[p]));
        acc[i] = a;
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots + j * ld + t), sum8(acc));
    }
  }
  int_dots_scalar(q, g, keys + m8 * stride, stride, m - m8, D, dots + m8, ld);
}

// Eight vectors of int32 partial sums -> their eight totals (pairwise within 128-bit lanes, then across them).
__attribute__((target("avx2"))) static inline __m256i sum8_avx2(const __m256i* v) {
  const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// int_dots_avx512 for CPUs with AVX2 only: sixteen dimensions per vector.
template <int D>
__attribute__((target("avx2"))) static void int_dots_avx2(const int16_t* q, int64_t g, const int8_t* keys,
                                                          int64_t stride, int64_t m, int32_t* dots, int64_t ld) {
  constexpr int P = D / 16;
  const int64_t m8 = m / 8 * 8;
  for (int64_t t = 0; t < m8; t += 8) {
    __m256i kv[8][P];
    for (int i = 0; i < 8; ++i)
      for (int p = 0; p < P; ++p)
        kv[i][p] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keys + (t + i) * stride + 16 * p)));
    for (int64_t j = 0; j < g; ++j) {
      __m256i acc[8];
      for (int i = 0; i < 8; ++i) {
        __m256i a = _mm256_setzero_si256();
        for (int p = 0; p < P; ++p)
          a = _mm256_add_epi32(a, _mm256_madd_epi16(kv[i][p], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j * D + 16 * p))));
        acc[i] = a;
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots + j * ld + t), sum8_avx2(acc));
    }
  }
  int_dots_scalar(q, g, keys + m8 * stride, stride, m - m8, D, dots + m8, ld);
}
#endif

static bool cpu_vnni() {
#ifdef SLAM_X86
  return __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

static int best_level() {
#ifdef SLAM_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return kAvx512;
  if (__builtin_cpu_supports("avx2")) return kAvx2;
#endif
  return kScalar;
}

static int level_named(const char* name, int otherwise) {
  for (int l = kScalar; l <= kAvx512; ++l)
    if (name && std::strcmp(name, kNames[l]) == 0) return l;
  return otherwise;
}

static int& level() {
  static int chosen = std::min(best_level(), level_named(std::getenv("ATEN_CPU_CAPABILITY"), kAvx512));
  return chosen;
}

const char* set_level(const char* name) {
  if (name && *name) level() = std::min(best_level(), level_named(name, best_level()));
  return kNames[level()];
}

int vector_level() { return level(); }

void int_dots(const int16_t* q, int64_t g, const int8_t* keys, int64_t stride, int64_t m, int64_t d, int32_t* dots,
              int64_t ld) {
#ifdef SLAM_X86
  if (level() == kAvx512) {
    static const bool vnni = cpu_vnni();
    if (d == 64) return vnni ? int_dots_avx512<64, true>(q, g, keys, stride, m, dots, ld)
                             : int_dots_avx512<64, false>(q, g, keys, stride, m, dots, ld);
    if (d == 128) return vnni ? int_dots_avx512<128, true>(q, g, keys, stride, m, dots, ld)
                              : int_dots_avx512<128, false>(q, g, keys, stride, m, dots, ld);
  }
  if (level() >= kAvx2) {
    if (d == 64) return int_dots_avx2<64>(q, g, keys, stride, m, dots, ld);
    if (d == 128) return int_dots_avx2<128>(q, g, keys, stride, m, dots, ld);
  }
#endif
  int_dots_scalar(q, g, keys, stride, m, d, dots, ld);
}

// o[t] = ok[t] ? float(dots[t] + low[t]) * (qs * scales[t]) * fs : -inf for t < m (low: nullptr, or the bounds'
// second dots); the same IEEE operations in the same order whatever the path.
static void scale_logits_scalar(const int32_t* dots, const int32_t* low, float qs, const float* scales, const bool* ok,
                         float fs, int64_t m, float* o) {
  for (int64_t t = 0; t < m; ++t) {
    const int32_t dot = low ? dots[t] + low[t] : dots[t];
    o[t] = ok[t] ? static_cast<float>(dot) * (qs * scales[t]) * fs : kNone;
  }
}

#ifdef SLAM_X86
__attribute__((target("avx512f,avx512bw"))) static void scale_logits_avx512(const int32_t* dots, const int32_t* low, float qs,
                                                                      const float* scales, const bool* ok, float fs,
                                                                      int64_t m, float* o) {
  const __m512 vq = _mm512_set1_ps(qs), vf = _mm512_set1_ps(fs), none = _mm512_set1_ps(kNone);
  const int64_t m16 = m / 16 * 16;
  for (int64_t t = 0; t < m16; t += 16) {
    __m512i di = _mm512_loadu_si512(dots + t);
    if (low) di = _mm512_add_epi32(di, _mm512_loadu_si512(low + t));
    const __m512 x = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(di), _mm512_mul_ps(vq, _mm512_loadu_ps(scales + t))), vf);
    const __m512i okv = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ok + t)));
    _mm512_storeu_ps(o + t, _mm512_mask_blend_ps(_mm512_test_epi32_mask(okv, okv), none, x));
  }
  scale_logits_scalar(dots + m16, low ? low + m16 : nullptr, qs, scales + m16, ok + m16, fs, m - m16, o + m16);
}

__attribute__((target("avx2"))) static void scale_logits_avx2(const int32_t* dots, const int32_t* low, float qs,
                                                              const float* scales, const bool* ok, float fs, int64_t m,
                                                              float* o) {
  const __m256 vq = _mm256_set1_ps(qs), vf = _mm256_set1_ps(fs), none = _mm256_set1_ps(kNone);
  const int64_t m8 = m / 8 * 8;
  for (int64_t t = 0; t < m8; t += 8) {
    __m256i di = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dots + t));
    if (low) di = _mm256_add_epi32(di, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + t)));
    const __m256 x = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(di), _mm256_mul_ps(vq, _mm256_loadu_ps(scales + t))), vf);
    const __m256i okv = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ok + t)));
    const __m256 stored = _mm256_castsi256_ps(_mm256_cmpgt_epi32(okv, _mm256_setzero_si256()));
    _mm256_storeu_ps(o + t, _mm256_blendv_ps(none, x, stored));
  }
  scale_logits_scalar(dots + m8, low ? low + m8 : nullptr, qs, scales + m8, ok + m8, fs, m - m8, o + m8);
}
#endif

void scale_logits(const int32_t* dots, const int32_t* low, float qs, const float* scales, const bool* ok, float fs,
                  int64_t m, float* o) {
#ifdef SLAM_X86
  if (level() == kAvx512) return scale_logits_avx512(dots, low, qs, scales, ok, fs, m, o);
  if (level() == kAvx2) return scale_logits_avx2(dots, low, qs, scales, ok, fs, m, o);
#endif
  scale_logits_scalar(dots, low, qs, scales, ok, fs, m, o);
}

}  // namespace slam_scores
