// Two-stage selection from int8 keys in one call per layer, each row (slot x KV head) start to end on one thread
// (two_stage_top_int8; cpu_kernels.cpp declares the op and holds the stages as separate ops, which this one
// equals: tests/test_cpu_kernels.py). Stage one scores every chunk by its int8 key bounds and keeps the best;
// stage two scores those chunks' tokens where they lie in the reserve and keeps the kc best.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "cpu_rows.h"
#include "cpu_scores.h"
#include "cpu_top.h"

namespace {

using slam_rows::check_bounds;
using slam_rows::check_reserve;
using slam_rows::filled_chunks;
using slam_rows::Int16Query;
using slam_rows::Int8Rows;
using slam_rows::row_logits;
using slam_rows::row_of;
using slam_top::Scratch;
using slam_top::top_row;

// Aten's log-softmax over the last dimension of x [g, m] (a thread's scratch) -> a tensor of its own. Each row's
// values do not depend on how many rows are computed together, so they equal the batched torch code's.
at::Tensor log_softmax_rows(float* x, int64_t g, int64_t m) {
  return at::log_softmax(at::from_blob(x, {g, m}, at::TensorOptions().dtype(at::kFloat)), -1);
}

// A thread's buffers for two_stage_row, grown once and reused across its rows.
struct TwoStageScratch {
  std::vector<int32_t> dots, low;
  std::vector<float> logits, sb, score;
  std::unique_ptr<bool[]> ok;
  int64_t ok_size = 0;
  std::vector<int64_t> ix;
  Scratch top;
  bool* oks(int64_t n) {
    if (n > ok_size) ok.reset(new bool[n]), ok_size = n;
    return ok.get();
  }
};

// Inputs of both stages for the rows of a batch (two_stage_top_int8).
struct TwoStageInputs {
  const Int16Query& q;
  int64_t h, g, d, chunks, first, chunk, kc;
  float fs;
  const at::Tensor &smin, &smax;  // row r's bounds at row_of(.., r), chunks `bound_stride` bytes apart
  int64_t bound_stride;
  const float* sscale;  // row r's chunk scales at sscale + (r / h) * s0 + (r % h) * s1
  int64_t s0, s1;
  const int8_t* keys;  // the whole reserve [slots, h, rows, d]
  const c10::BFloat16* s16;
  const float* s32;
  int64_t rows;
  const int64_t* rpos;  // [slots, rows]
  const int64_t* stored;
  const bool* chunk_ok;  // [b, chunks]
};

constexpr int64_t kAheadChunks = 6;

// Both stages for row r = slot * h + head, start to end on one thread (two_stage_top_int8): stage one's chunk
// scores and their `first` best (-> chosen), then the tokens of those chunks scored in place, eight reserve rows
// a chunk, and their kc best -> reserve indices and scores at out_idx, out_score [kc].
void two_stage_row(const TwoStageInputs& in, int64_t r, int64_t* chosen_out, int64_t* out_idx, float* out_score,
                   TwoStageScratch& w) {
  const int64_t g = in.g, d = in.d, m1 = in.chunks, c = in.first * in.chunk, i = r / in.h, q0 = r * g * d;
  const int64_t ld = std::max(m1, c);
  w.dots.resize(g * ld), w.low.resize(g * ld), w.logits.resize(g * ld);
  const bool* ok1 = in.chunk_ok + i * m1;
  const Int8Rows bounds{row_of(in.smax, r), row_of(in.smin, r), in.bound_stride,
                        in.sscale + i * in.s0 + (r % in.h) * in.s1, ok1};
  row_logits(in.q, r, g, d, bounds, 0, m1, in.fs, w.dots.data(), w.low.data(), ld, w.logits.data(), m1);
  {
    const at::Tensor lp = log_softmax_rows(w.logits.data(), g, m1);
    w.score.resize(std::max(in.first, in.kc));
    top_row(lp.data_ptr<float>(), g, m1, ok1, nullptr, in.first, chosen_out, w.score.data(), w.top);
  }
  // Stage two over the chosen chunks' tokens, read where they lie in the reserve.
  const int64_t base = r * in.rows, n = in.stored[i];
  const int64_t* rp = in.rpos + i * in.rows;
  w.sb.resize(c), w.ix.resize(c);
  bool* ok2 = w.oks(c);
  for (int64_t j = 0; j < in.first; ++j) {
    const int64_t first_row = chosen_out[j] * in.chunk;
    if (j + kAheadChunks < in.first) {  // chunks lie far apart in a reserve far larger than the caches
      const int64_t ahead = base + chosen_out[j + kAheadChunks] * in.chunk;
      for (int64_t o = 0; o < in.chunk * d; o += 64) __builtin_prefetch(in.keys + ahead * d + o);
      __builtin_prefetch(in.s16 ? static_cast<const void*>(in.s16 + ahead) : static_cast<const void*>(in.s32 + ahead));
      __builtin_prefetch(rp + (ahead - base));
    }
    slam_scores::int_dots(in.q.q16.data() + q0, g, in.keys + (base + first_row) * d, d, in.chunk, d,
                          w.dots.data() + j * in.chunk, ld);
    for (int64_t o = 0; o < in.chunk; ++o) {
      const int64_t t = j * in.chunk + o, k = first_row + o;
      w.ix[t] = k;
      w.sb[t] = in.s16 ? static_cast<float>(in.s16[base + k]) : in.s32[base + k];
      ok2[t] = k < n && rp[k] >= 0;
    }
  }
  for (int64_t j = 0; j < g; ++j)
    slam_scores::scale_logits(w.dots.data() + j * ld, nullptr, in.q.qs[r * g + j], w.sb.data(), ok2, in.fs, c,
                              w.logits.data() + j * c);
  const at::Tensor lp = log_softmax_rows(w.logits.data(), g, c);
  top_row(lp.data_ptr<float>(), g, c, ok2, w.ix.data(), in.kc, out_idx, out_score, w.top);
}

// Both stages in one call, stage one refreshed: stage one over chunks [0, chunks) of the layer's bounds, its picks
// written to cand[:b, :, :first] (int32: the chunks later steps re-rank), then stage two over every token of those
// chunks, as stage_one then stage_two compute them. Each row runs both stages on one thread, so that no thread
// waits for the others between the stages' seven steps. smin, smax, sscale, cand: the layer's whole buffers;
// keys, scales, rpos: the whole reserve.
std::tuple<at::Tensor, at::Tensor> two_stage_top_int8(const at::Tensor& q, const at::Tensor& smin,
                                                      const at::Tensor& smax, const at::Tensor& sscale,
                                                      const at::Tensor& keys, const at::Tensor& scales,
                                                      const at::Tensor& rpos, const at::Tensor& n, at::Tensor cand,
                                                      int64_t chunks, int64_t first, int64_t chunk, int64_t kc,
                                                      double scale) {
  TORCH_CHECK(cand.scalar_type() == at::kInt && cand.size(2) >= first && cand.stride(2) == 1,
              "cand: [slots, h, >= first] int32");
  check_bounds(smin, smax, sscale);
  check_reserve(keys, scales, rpos);
  const int64_t b = q.size(0), h = q.size(1), g = q.size(2), d = q.size(3), c = first * chunk;
  TORCH_CHECK(first <= chunks && chunks <= smin.size(2) && b <= smin.size(0), "chunks: first <= chunks <= bounds");
  TORCH_CHECK(kc <= c && keys.size(3) == d, "kc above the candidates");
  const at::Tensor nn = n.to(at::kLong).contiguous();
  const int64_t* stored = nn.data_ptr<int64_t>();
  const Int16Query qi(q, true);
  const std::unique_ptr<bool[]> chunk_ok = filled_chunks(stored, b, chunks, chunk);
  const bool bf16 = scales.scalar_type() == at::kBFloat16;
  const TwoStageInputs in{qi, h, g, d, chunks, first, chunk, kc,
                          static_cast<float>(scale), smin, smax, smax.stride(2),
                          sscale.data_ptr<float>(), sscale.stride(0), sscale.stride(1), keys.data_ptr<int8_t>(),
                          bf16 ? scales.data_ptr<c10::BFloat16>() : nullptr, bf16 ? nullptr : scales.data_ptr<float>(),
                          keys.size(2), rpos.data_ptr<int64_t>(), stored, chunk_ok.get()};
  std::vector<int64_t> chosen(b * h * first);
  at::Tensor out_idx = at::empty({b, h, kc}, nn.options());
  at::Tensor out_score = at::empty({b, h, kc}, q.options().dtype(at::kFloat));
  int64_t* oi = out_idx.data_ptr<int64_t>();
  float* os = out_score.data_ptr<float>();
  at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
    TwoStageScratch w;
    for (int64_t r = begin; r < end; ++r)
      two_stage_row(in, r, chosen.data() + r * first, oi + r * kc, os + r * kc, w);
  });
  int32_t* cand_p = cand.data_ptr<int32_t>();
  for (int64_t r = 0; r < b * h; ++r)
    for (int64_t j = 0; j < first; ++j)
      cand_p[(r / h) * cand.stride(0) + (r % h) * cand.stride(1) + j] = static_cast<int32_t>(chosen[r * first + j]);
  return {out_idx, out_score};
}

}  // namespace

TORCH_LIBRARY_IMPL(slam_cpu, CPU, m) { m.impl("two_stage_top_int8", &two_stage_top_int8); }
