// One row of int8 scoring keys, or of chunk bounds, and the query that scores it (declared in cpu_rows.h).
#include "cpu_rows.h"

#include <algorithm>

#include "cpu_scores.h"

namespace slam_rows {

Int16Query::Int16Query(const at::Tensor& q, bool bounds) {
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  const int64_t n = q.size(0) * q.size(1) * q.size(2), d = q.size(3);
  q16.resize(n * d), qs.resize(n);
  slam_scores::quantize_query(qf.data_ptr<float>(), n, d, q16.data(), qs.data());
  if (bounds) {
    qpos.resize(n * d), qneg.resize(n * d);
    for (int64_t i = 0; i < n * d; ++i)
      qpos[i] = std::max<int16_t>(q16[i], 0), qneg[i] = std::min<int16_t>(q16[i], 0);
  }
}

void row_logits(const Int16Query& q, int64_t r, int64_t g, int64_t d, const Int8Rows& row, int64_t lo, int64_t hi,
                float fs, int32_t* dots, int32_t* low, int64_t ld, float* out, int64_t out_ld) {
  const int64_t q0 = r * g * d;
  if (row.lower) {
    slam_scores::int_dots(q.qpos.data() + q0, g, row.keys + lo * row.stride, row.stride, hi - lo, d, dots, ld);
    slam_scores::int_dots(q.qneg.data() + q0, g, row.lower + lo * row.stride, row.stride, hi - lo, d, low, ld);
  } else {
    slam_scores::int_dots(q.q16.data() + q0, g, row.keys + lo * row.stride, row.stride, hi - lo, d, dots, ld);
  }
  for (int64_t j = 0; j < g; ++j)
    slam_scores::scale_logits(dots + j * ld, row.lower ? low + j * ld : nullptr, q.qs[r * g + j], row.scales + lo,
                              row.ok + lo, fs, hi - lo, out + j * out_ld + lo);
}

const int8_t* row_of(const at::Tensor& t, int64_t r) {
  const int64_t h = t.size(1);
  return t.data_ptr<int8_t>() + (r / h) * t.stride(0) + (r % h) * t.stride(1);
}

void check_bounds(const at::Tensor& smin, const at::Tensor& smax, const at::Tensor& sscale) {
  TORCH_CHECK(smin.scalar_type() == at::kChar && smax.scalar_type() == at::kChar, "bounds: int8");
  TORCH_CHECK(smin.stride(3) == 1 && smax.stride(3) == 1 && smin.stride(2) == smax.stride(2), "bounds: rows");
  TORCH_CHECK(sscale.scalar_type() == at::kFloat && sscale.stride(2) == 1, "sscale: float32, chunks contiguous");
}

void check_reserve(const at::Tensor& keys, const at::Tensor& scales, const at::Tensor& rpos) {
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kChar && keys.is_contiguous(), "keys: int8 reserve");
  TORCH_CHECK(scales.is_contiguous() && rpos.is_contiguous() && rpos.scalar_type() == at::kLong, "scales, rpos");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 || scales.scalar_type() == at::kFloat, "scales dtype");
}

std::unique_ptr<bool[]> filled_chunks(const int64_t* stored, int64_t b, int64_t chunks, int64_t chunk) {
  std::unique_ptr<bool[]> ok(new bool[b * chunks]);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t c = 0; c < chunks; ++c) ok[i * chunks + c] = c * chunk < stored[i];
  return ok;
}

}  // namespace slam_rows
