// One row of int8 scoring keys, or of chunk bounds, and the query that scores it (cpu_rows.cpp), shared by
// cpu_kernels.cpp's selection ops and cpu_two_stage.cpp.
//
// Int8 scoring keys are scored in exact integer arithmetic (cpu_scores.cpp): the query rounded to int16 with one
// float32 scale per query row, products summed in int32 (no rounding, so any order of the sums gives the same
// value), then float(dot) * (query scale * key scale) * softmax scale: selection.dot_int8's arithmetic, which
// the torch code computes in float64 and so matches bit for bit.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace slam_rows {

// One row's int8 keys (or a chunk's two bounds): keys [m] rows `stride` bytes apart, scales [m] float32; `lower`
// (bounds): the rows q's negative part meets, keys then being the upper bounds q's positive part meets.
struct Int8Rows {
  const int8_t* keys;
  const int8_t* lower;
  int64_t stride;
  const float* scales;
  const bool* ok;  // [m] stored
};

// The queries q [b, h, g, d] rounded to int16 with a scale per query row (selection.quantize_query); with
// `bounds`, also their positive part (which meets the upper bounds) and negative part (the lower ones).
struct Int16Query {
  std::vector<int16_t> q16, qpos, qneg;
  std::vector<float> qs;
  Int16Query(const at::Tensor& q, bool bounds);
};

// Logits of keys [lo, hi) of row r (slot * h + head) for its g queries: int_dots (both bounds' when row.lower is
// set) into dots and low [g, ld], then scale_logits into out [g, out_ld] from column lo.
void row_logits(const Int16Query& q, int64_t r, int64_t g, int64_t d, const Int8Rows& row, int64_t lo, int64_t hi,
                float fs, int32_t* dots, int32_t* low, int64_t ld, float* out, int64_t out_ld);

// Row r = slot * h + head of a [b, h, m, d] int8 tensor whose last dimension is contiguous.
const int8_t* row_of(const at::Tensor& t, int64_t r);

// The layouts the stages read: int8 chunk bounds with rows of contiguous bytes and float32 scales with chunks
// contiguous; an int8 reserve with its scales (bfloat16 or float32) and positions, all contiguous.
void check_bounds(const at::Tensor& smin, const at::Tensor& smax, const at::Tensor& sscale);
void check_reserve(const at::Tensor& keys, const at::Tensor& scales, const at::Tensor& rpos);

// Which of chunks [0, chunks) hold a token, per slot: [b, chunks], from the tokens stored [b].
std::unique_ptr<bool[]> filled_chunks(const int64_t* stored, int64_t b, int64_t chunks, int64_t chunk);

}  // namespace slam_rows
