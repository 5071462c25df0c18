// Decode rows times int8 weights on CPUs (engine/int8.py's decode path; cache/cpu_kernels.py builds this file with
// the other ops): y [M, N] = x [M, K] . w [N, K]^T x scale [N], x and y float32, w int8 with one scale per row.
// aten's weight-only int8 kernel costs each decode row nearly a pass over the weights (four rows: 1.4x one), while
// a decode step is bound by reading them once; here each block of four weight rows is widened once and multiplied
// by every row of x. Every (m, n) sums its products in the same order whatever M and whatever the vector path:
// sixteen running sums over k (lane k mod 16, fused multiply-adds), added pairwise (lanes l and l + 8, then + 4,
// + 2, + 1), then the tail of K beyond a multiple of 16 in order, then the scale. So a row gets the same bits alone
// or batched, on AVX-512, AVX2 or the scalar loop (tests/test_cpu_kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_scores.h"

#if defined(__x86_64__) && !defined(_MSC_VER)
#include <immintrin.h>
#define SLAM_X86 1
#endif

namespace {

// A thread streams its weight rows once per step, from memory: the line about 4 KB ahead is requested while this
// one is multiplied (measured on 2 Xeon cores: 1.8x to 2.1x faster than the hardware prefetch alone at one row of x).
constexpr int64_t kAhead = 4096;

using slam_scores::reduce16;

inline float finish(float total, const float* x, const int8_t* w, int64_t k0, int64_t K, float scale) {
  for (int64_t k = k0; k < K; ++k) total = std::fma(x[k], static_cast<float>(w[k]), total);
  return total * scale;
}

// R weight rows from n times MB rows of x.
template <int MB, int R>
void block_scalar(const float* x, int64_t K, const int8_t* w, const float* scale, int64_t n, float* y, int64_t N) {
  const int64_t K16 = K / 16 * 16;
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float s[16] = {};
      const float* xm = x + m * K;
      const int8_t* wr = w + (n + r) * K;
      for (int64_t k = 0; k < K16; k += 16)
        for (int l = 0; l < 16; ++l) s[l] = std::fma(xm[k + l], static_cast<float>(wr[k + l]), s[l]);
      y[m * N + n + r] = finish(reduce16(s), xm, wr, K16, K, scale[n + r]);
    }
}

#ifdef SLAM_X86
template <int MB, int R>
__attribute__((target("avx512f"))) void block_avx512(const float* x, int64_t K, const int8_t* w, const float* scale,
                                                      int64_t n, float* y, int64_t N) {
  const int64_t K16 = K / 16 * 16;
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w + n * K) + kAhead;
  for (int64_t k = 0; k < K16; k += 16) {
    if (R == 4) _mm_prefetch(ahead + 4 * k, _MM_HINT_T0);  // four rows of 16 bytes: one line per step of k
    __m512 wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + r) * K + k))));
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  alignas(64) float s[16];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      _mm512_store_ps(s, acc[m][r]);
      y[m * N + n + r] = finish(reduce16(s), x + m * K, w + (n + r) * K, K16, K, scale[n + r]);
    }
}

// Sixteen lanes as two vectors of eight: lo holds lanes 0-7, hi lanes 8-15.
template <int MB, int R>
__attribute__((target("avx2,fma"))) void block_avx2(const float* x, int64_t K, const int8_t* w, const float* scale,
                                                     int64_t n, float* y, int64_t N) {
  const int64_t K16 = K / 16 * 16;
  __m256 lo[MB][R], hi[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) lo[m][r] = hi[m][r] = _mm256_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w + n * K) + kAhead;
  for (int64_t k = 0; k < K16; k += 16) {
    if (R == 4) _mm_prefetch(ahead + 4 * k, _MM_HINT_T0);
    __m256 wl[R], wh[R];
    for (int r = 0; r < R; ++r) {
      const int8_t* p = w + (n + r) * K + k;
      wl[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
      wh[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
    }
    for (int m = 0; m < MB; ++m) {
      const __m256 xl = _mm256_loadu_ps(x + m * K + k), xh = _mm256_loadu_ps(x + m * K + k + 8);
      for (int r = 0; r < R; ++r) {
        lo[m][r] = _mm256_fmadd_ps(wl[r], xl, lo[m][r]);
        hi[m][r] = _mm256_fmadd_ps(wh[r], xh, hi[m][r]);
      }
    }
  }
  alignas(32) float s[16];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(s, lo[m][r]);
      _mm256_store_ps(s + 8, hi[m][r]);
      y[m * N + n + r] = finish(reduce16(s), x + m * K, w + (n + r) * K, K16, K, scale[n + r]);
    }
}
#endif

template <int MB, int R>
void block(int level, const float* x, int64_t K, const int8_t* w, const float* scale, int64_t n, float* y, int64_t N) {
#ifdef SLAM_X86
  if (level == 2) return block_avx512<MB, R>(x, K, w, scale, n, y, N);
  if (level == 1) return block_avx2<MB, R>(x, K, w, scale, n, y, N);
#endif
  block_scalar<MB, R>(x, K, w, scale, n, y, N);
}

// Rows of x in fours against R weight rows from n (those rows stay in L1 for every four).
template <int R>
void rows(int level, const float* x, int64_t M, int64_t K, const int8_t* w, const float* scale, int64_t n, float* y,
          int64_t N) {
  for (int64_t m = 0; m < M; m += 4) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (std::min<int64_t>(4, M - m)) {
      case 4: block<4, R>(level, xm, K, w, scale, n, ym, N); break;
      case 3: block<3, R>(level, xm, K, w, scale, n, ym, N); break;
      case 2: block<2, R>(level, xm, K, w, scale, n, ym, N); break;
      default: block<1, R>(level, xm, K, w, scale, n, ym, N);
    }
  }
}

// x [M, K] float32, w [N, K] int8, scale [N] float32 -> [M, N] float32.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_linear: x [M, K], w [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat && scale.numel() == w.size(0),
              "int8_linear: int8 weights, float32 scales");
  const at::Tensor xc = x.to(at::kFloat).contiguous(), wc = w.contiguous(), sc = scale.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  const int level = slam_scores::vector_level();
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = N / 4;
  // Weight rows over the intra-op threads, sixty-four or more a task: each thread streams its own part.
  at::parallel_for(0, blocks, 16, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) rows<4>(level, xp, M, K, wp, sp, 4 * i, yp, N);
  });
  for (int64_t n = blocks * 4; n < N; ++n) rows<1>(level, xp, M, K, wp, sp, n, yp, N);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(slam_cpu, CPU, m) { m.impl("int8_linear", &int8_linear); }
