// Integer scoring of int8 keys on CPUs (cpu_scores.cpp), used by the selection ops (cpu_kernels.cpp,
// cpu_two_stage.cpp).
#pragma once

#include <cstdint>

namespace slam_scores {

// q [n, d] float32 -> int16 [n, d] and scales [n]: max |q| / 32767 per row (1e-30 at least), q / scale rounded
// half to even (torch.round), as selection.quantize_query.
void quantize_query(const float* q, int64_t n, int64_t d, int16_t* out, float* scale);

// dots[j][t] = sum_k q[j][k] * keys[t][k], exact in int32, for queries j < g ([g, d] int16) and keys t < m (rows
// of d int8, `stride` bytes apart) -> dots [g, ld].
void int_dots(const int16_t* q, int64_t g, const int8_t* keys, int64_t stride, int64_t m, int64_t d, int32_t* dots,
              int64_t ld);

// o[t] = ok[t] ? float(dots[t] + low[t]) * (qs * scales[t]) * fs : -inf for t < m (low: nullptr, or the bounds'
// second dots); the same IEEE operations in the same order whatever the path.
void scale_logits(const int32_t* dots, const int32_t* low, float qs, const float* scales, const bool* ok, float fs,
                  int64_t m, float* o);

// The vector path the scoring takes: "avx512", "avx2" or "default" (scalar). name: a level to cap it at (the best
// the CPU runs otherwise; ATEN_CPU_CAPABILITY caps it at start), or empty to only ask.
const char* set_level(const char* name);

// The same path as a number: 0 scalar, 1 AVX2, 2 AVX-512 (the int8 weights' product, cpu_linear.cpp, follows it).
int vector_level();

// Sixteen running float sums -> their total, added pairwise (lanes l and l + 8, then + 4, + 2, + 1): the one order
// of additions that keeps the float ops' rows the same on every vector path (cpu_linear.cpp, cpu_attention.cpp).
inline float reduce16(const float* s) {
  float a[8], b[4];
  for (int l = 0; l < 8; ++l) a[l] = s[l] + s[l + 8];
  for (int l = 0; l < 4; ++l) b[l] = a[l] + a[l + 4];
  return (b[0] + b[2]) + (b[1] + b[3]);
}

}  // namespace slam_scores
