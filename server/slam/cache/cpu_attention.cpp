// Decode attention over the slot pool on CPUs (engine/model_runner.py; cache/cpu_kernels.py builds this file with
// the other ops): one query per slot and query head against the slot's budget columns of its KV head. aten's SDPA
// on a bfloat16 cache costs a CPU decode step 150 us a layer at one request and 510 at four (float32: 27 and 82),
// for a few hundred thousand multiply-adds. Here each (slot, KV head) row reads its keys and values once for the
// whole query group, in their stored dtype, and computes in float32:
//   logit[g][c] = q[g] . k[c] x scale where valid[c], else -inf;  out[g] = sum_c softmax(logit[g])[c] v[c].
// A dot sums its products in sixteen running sums over d (lane d mod 16, fused multiply-adds), added pairwise, then
// the tail of d; the weighted sum of values adds the columns in order, one fused multiply-add per (c, d). So a row's
// bits depend neither on the batch nor on the vector path (tests/test_cpu_kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_scores.h"

#if defined(__x86_64__) && !defined(_MSC_VER)
#include <immintrin.h>
#define SLAM_X86 1
#endif

namespace {

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

using slam_scores::reduce16;

template <typename T>
float dot_scalar(const float* q, const T* k, int64_t d) {
  const int64_t d16 = d / 16 * 16;
  float s[16] = {};
  for (int64_t i = 0; i < d16; i += 16)
    for (int l = 0; l < 16; ++l) s[l] = std::fma(q[i + l], widen(k[i + l]), s[l]);
  float total = reduce16(s);
  for (int64_t i = d16; i < d; ++i) total = std::fma(q[i], widen(k[i]), total);
  return total;
}

template <typename T>
void axpy_scalar(float p, const T* v, float* out, int64_t d) {
  for (int64_t i = 0; i < d; ++i) out[i] = std::fma(p, widen(v[i]), out[i]);
}

#ifdef SLAM_X86
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx2"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2"))) inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename T>
__attribute__((target("avx512f"))) float dot_avx512(const float* q, const T* k, int64_t d) {
  const int64_t d16 = d / 16 * 16;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d16; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16(k + i), acc);
  alignas(64) float s[16];
  _mm512_store_ps(s, acc);
  float total = reduce16(s);
  for (int64_t i = d16; i < d; ++i) total = std::fma(q[i], widen(k[i]), total);
  return total;
}

template <typename T>
__attribute__((target("avx512f"))) void axpy_avx512(float p, const T* v, float* out, int64_t d) {
  const int64_t d16 = d / 16 * 16;
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t i = 0; i < d16; i += 16)
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(pv, load16(v + i), _mm512_loadu_ps(out + i)));
  for (int64_t i = d16; i < d; ++i) out[i] = std::fma(p, widen(v[i]), out[i]);
}

// Sixteen lanes as two vectors of eight: lo holds lanes 0-7, hi lanes 8-15.
template <typename T>
__attribute__((target("avx2,fma"))) float dot_avx2(const float* q, const T* k, int64_t d) {
  const int64_t d16 = d / 16 * 16;
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (int64_t i = 0; i < d16; i += 16) {
    lo = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), lo);
    hi = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), hi);
  }
  alignas(32) float s[16];
  _mm256_store_ps(s, lo);
  _mm256_store_ps(s + 8, hi);
  float total = reduce16(s);
  for (int64_t i = d16; i < d; ++i) total = std::fma(q[i], widen(k[i]), total);
  return total;
}

template <typename T>
__attribute__((target("avx2,fma"))) void axpy_avx2(float p, const T* v, float* out, int64_t d) {
  const int64_t d8 = d / 8 * 8;
  const __m256 pv = _mm256_set1_ps(p);
  for (int64_t i = 0; i < d8; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(out + i)));
  for (int64_t i = d8; i < d; ++i) out[i] = std::fma(p, widen(v[i]), out[i]);
}

// Sixteen keys' dots at once for head_dim 16 x P: each key's sixteen running sums as above, then reduced across the
// sixteen vectors by shuffles in the same pairwise order (lanes 8 apart, then 4, 2, 1) -> logits [16] x scale.
template <int P, typename T>
__attribute__((target("avx512f"))) void dots16_avx512(const float* q, const T* k, float scale, float* out) {
  __m512 qv[P], acc[16];
  for (int p = 0; p < P; ++p) qv[p] = _mm512_loadu_ps(q + 16 * p);
  for (int i = 0; i < 16; ++i) {
    __m512 a = _mm512_setzero_ps();
    for (int p = 0; p < P; ++p) a = _mm512_fmadd_ps(qv[p], load16(k + (i * P + p) * 16), a);
    acc[i] = a;
  }
  __m512 x[8], z[4], w[2];
  for (int i = 0; i < 8; ++i)  // lanes l + (l + 8): keys 2i, 2i + 1 in halves
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(acc[2 * i], acc[2 * i + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // + 4: keys 4j .. 4j + 3 in 128-bit blocks
    z[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0xDD));
  for (int u = 0; u < 2; ++u)  // + 2
    w[u] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * u], z[2 * u + 1], 0x44), _mm512_shuffle_ps(z[2 * u], z[2 * u + 1], 0xEE));
  // + 1: lane 4k + p holds key k + 4p; the permutation puts key j in lane j.
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutexvar_ps(order, t), _mm512_set1_ps(scale)));
}

// out [d] = sum over columns j (in order) of p[j] v[j] for head_dim 16 x P, the sums held in registers.
template <int P, typename T>
__attribute__((target("avx512f"))) void weigh_avx512(const float* p, const T* v, const bool* ok, int64_t c, float* out) {
  __m512 acc[P];
  for (int e = 0; e < P; ++e) acc[e] = _mm512_setzero_ps();
  for (int64_t j = 0; j < c; ++j) {
    if (!ok[j]) continue;
    const __m512 pv = _mm512_set1_ps(p[j]);
    for (int e = 0; e < P; ++e) acc[e] = _mm512_fmadd_ps(pv, load16(v + (j * P + e) * 16), acc[e]);
  }
  for (int e = 0; e < P; ++e) _mm512_storeu_ps(out + 16 * e, acc[e]);
}
#endif

template <typename T>
float dot(int level, const float* q, const T* k, int64_t d) {
#ifdef SLAM_X86
  if (level == 2) return dot_avx512(q, k, d);
  if (level == 1) return dot_avx2(q, k, d);
#endif
  return dot_scalar(q, k, d);
}

template <typename T>
void axpy(int level, float p, const T* v, float* out, int64_t d) {
#ifdef SLAM_X86
  if (level == 2) return axpy_avx512(p, v, out, d);
  if (level == 1) return axpy_avx2(p, v, out, d);
#endif
  axpy_scalar(p, v, out, d);
}

// One (slot, KV head): q [g, d] float32, k and v [c, d], ok [c] -> out [g, d] float32. logit: scratch [g, c].
// P: head_dim / 16 where the AVX-512 path has a register-blocked kernel for it (64 and 128), else 0.
template <int P, typename T>
void attend_row(int level, const float* q, int64_t g, const T* k, const T* v, const bool* ok, int64_t c, int64_t d,
                float scale, float* out, float* logit) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  std::vector<float> top(g, kNone), sum(g, 0.0f);
  int64_t j0 = 0;
#ifdef SLAM_X86
  if (P > 0 && level == 2) {
    for (; j0 + 16 <= c; j0 += 16)
      for (int64_t i = 0; i < g; ++i) dots16_avx512<P>(q + i * d, k + j0 * d, scale, logit + i * c + j0);
    for (int64_t i = 0; i < g; ++i)
      for (int64_t j = 0; j < j0; ++j) {
        float& x = logit[i * c + j];
        x = ok[j] ? x : kNone;
        top[i] = std::max(top[i], x);
      }
  }
#endif
  for (int64_t j = j0; j < c; ++j)
    for (int64_t i = 0; i < g; ++i) {
      const float x = ok[j] ? dot(level, q + i * d, k + j * d, d) * scale : kNone;
      logit[i * c + j] = x;
      top[i] = std::max(top[i], x);
    }
  std::fill(out, out + g * d, 0.0f);
  for (int64_t i = 0; i < g; ++i) {
    if (top[i] == kNone) continue;  // no column to attend: zeros (the engine always leaves one)
    float* row = logit + i * c;
    for (int64_t j = 0; j < c; ++j) {
      row[j] = ok[j] ? std::exp(row[j] - top[i]) : 0.0f;
      sum[i] += row[j];
    }
  }
#ifdef SLAM_X86
  if (P > 0 && level == 2) {
    for (int64_t i = 0; i < g; ++i)
      if (top[i] != kNone) weigh_avx512<P>(logit + i * c, v, ok, c, out + i * d);
  } else
#endif
    for (int64_t j = 0; j < c; ++j) {
      if (!ok[j]) continue;
      for (int64_t i = 0; i < g; ++i) axpy(level, logit[i * c + j], v + j * d, out + i * d, d);
    }
  for (int64_t i = 0; i < g; ++i) {
    if (top[i] == kNone) continue;
    const float inv = 1.0f / sum[i];
    for (int64_t e = 0; e < d; ++e) out[i * d + e] *= inv;
  }
}

// q [b, h * g, 1, d] (any float dtype), k and v [b, h, c, d] float32 or bfloat16, valid [b, h, 1, c] bool
// -> [b, h * g, 1, d] float32.
at::Tensor decode_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& valid,
                         double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(2) == 1,
              "decode_attend: q [b, heads, 1, d], k and v [b, kv_heads, c, d]");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attend: keys and values both float32 or bfloat16");
  const int64_t b = k.size(0), h = k.size(1), c = k.size(2), d = k.size(3), g = q.size(1) / h;
  TORCH_CHECK(q.size(0) == b && q.size(1) == h * g && q.size(3) == d, "decode_attend: q and k disagree");
  TORCH_CHECK(valid.numel() == b * h * c && valid.scalar_type() == at::kBool, "decode_attend: valid [b, h, 1, c]");
  const at::Tensor qc = q.to(at::kFloat).contiguous(), kc = k.contiguous(), vc = v.contiguous(),
                   ok = valid.contiguous();
  at::Tensor out = at::empty({b, h * g, 1, d}, qc.options());
  const int level = slam_scores::vector_level();
  const float* qp = qc.data_ptr<float>();
  const bool* okp = ok.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const auto run = [&](auto* kp, auto* vp) {
    at::parallel_for(0, b * h, 1, [&](int64_t first, int64_t last) {
      std::vector<float> logit(g * c);
      for (int64_t r = first; r < last; ++r) {
        const auto row = [&](auto attend) {
          attend(level, qp + r * g * d, g, kp + r * c * d, vp + r * c * d, okp + r * c, c, d, static_cast<float>(scale),
                 op + r * g * d, logit.data());
        };
        using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
        if (d == 64)
          row(attend_row<4, T>);
        else if (d == 128)
          row(attend_row<8, T>);
        else
          row(attend_row<0, T>);
      }
    });
  };
  if (kc.scalar_type() == at::kBFloat16)
    run(kc.data_ptr<at::BFloat16>(), vc.data_ptr<at::BFloat16>());
  else
    run(kc.data_ptr<float>(), vc.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(slam_cpu, CPU, m) { m.impl("decode_attend", &decode_attend); }
