// Two-stage selection from int8 keys, each row (slot x KV head) start to end on one thread. two_stage_top_int8, at a
// layer's refresh: stage one scores every chunk by its int8 key bounds and keeps the best; stage two scores those
// chunks' tokens where they lie in the reserve and keeps the kc best. candidate_top_int8, between refreshes: stage
// two alone over the chunks chosen last and the latest. cpu_kernels.cpp declares both ops and holds stage one as an
// op of its own, which the first equals (tests/test_cpu_kernels.py).
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

// Stage two's inputs for the rows of a batch: the query, the whole int8 reserve and what each slot stores.
struct StageTwoInputs {
  const Int16Query& q;
  int64_t h, g, d, chunk, kc;
  float fs;
  const int8_t* keys;  // the whole reserve [slots, h, rows, d]
  const c10::BFloat16* s16;
  const float* s32;
  int64_t rows;
  const int64_t* rpos;  // [slots, rows]
  const int64_t* stored;
};

StageTwoInputs stage_two_inputs(const Int16Query& qi, const at::Tensor& q, const at::Tensor& keys,
                                const at::Tensor& scales, const at::Tensor& rpos, const int64_t* stored, int64_t chunk,
                                int64_t kc, double scale) {
  const bool bf16 = scales.scalar_type() == at::kBFloat16;
  return {qi, q.size(1), q.size(2), q.size(3), chunk, kc, static_cast<float>(scale), keys.data_ptr<int8_t>(),
          bf16 ? scales.data_ptr<c10::BFloat16>() : nullptr, bf16 ? nullptr : scales.data_ptr<float>(), keys.size(2),
          rpos.data_ptr<int64_t>(), stored};
}

// Stage one's inputs besides: the bounds of chunks [0, chunks) and which of them hold tokens.
struct StageOneInputs {
  int64_t chunks, first;
  const at::Tensor &smin, &smax;  // row r's bounds at row_of(.., r), chunks `bound_stride` bytes apart
  int64_t bound_stride;
  const float* sscale;  // row r's chunk scales at sscale + (r / h) * s0 + (r % h) * s1
  int64_t s0, s1;
  const bool* chunk_ok;  // [b, chunks]
};

constexpr int64_t kAheadChunks = 6;

// Stage two for row r = slot * h + head: the tokens of chunks cs [nc] (chunk j: reserve rows [cs[j] * chunk,
// (cs[j] + 1) * chunk)), scored where they lie in the reserve, a chunk whose `fresh` entry is false (a repeat)
// left out, and their kc best -> reserve indices and scores at out_idx, out_score [kc], ties to the lower index.
void stage_two_row(const StageTwoInputs& in, int64_t r, const int64_t* cs, int64_t nc, const bool* fresh,
                   int64_t* out_idx, float* out_score, TwoStageScratch& w) {
  const int64_t g = in.g, d = in.d, c = nc * in.chunk, i = r / in.h, q0 = r * g * d;
  const int64_t base = r * in.rows, n = in.stored[i];
  const int64_t* rp = in.rpos + i * in.rows;
  w.dots.resize(g * c), w.logits.resize(g * c), w.sb.resize(c), w.ix.resize(c);
  bool* ok = w.oks(c);
  for (int64_t j = 0; j < nc; ++j) {
    const int64_t first_row = cs[j] * in.chunk;
    if (j + kAheadChunks < nc) {  // chunks lie far apart in a reserve far larger than the caches
      const int64_t ahead = base + cs[j + kAheadChunks] * in.chunk;
      for (int64_t o = 0; o < in.chunk * d; o += 64) __builtin_prefetch(in.keys + ahead * d + o);
      __builtin_prefetch(in.s16 ? static_cast<const void*>(in.s16 + ahead) : static_cast<const void*>(in.s32 + ahead));
      __builtin_prefetch(rp + (ahead - base));
    }
    slam_scores::int_dots(in.q.q16.data() + q0, g, in.keys + (base + first_row) * d, d, in.chunk, d,
                          w.dots.data() + j * in.chunk, c);
    const bool take = !fresh || fresh[j];
    for (int64_t o = 0; o < in.chunk; ++o) {
      const int64_t t = j * in.chunk + o, k = first_row + o;
      w.ix[t] = k;
      w.sb[t] = in.s16 ? static_cast<float>(in.s16[base + k]) : in.s32[base + k];
      ok[t] = take && k < n && rp[k] >= 0;
    }
  }
  for (int64_t j = 0; j < g; ++j)
    slam_scores::scale_logits(w.dots.data() + j * c, nullptr, in.q.qs[r * g + j], w.sb.data(), ok, in.fs, c,
                              w.logits.data() + j * c);
  const at::Tensor lp = log_softmax_rows(w.logits.data(), g, c);
  top_row(lp.data_ptr<float>(), g, c, ok, w.ix.data(), in.kc, out_idx, out_score, w.top);
}

// Both stages for row r, start to end on one thread (two_stage_top_int8): stage one's chunk scores and their
// `first` best (-> chosen), then stage_two_row over those chunks.
void two_stage_row(const StageTwoInputs& in, const StageOneInputs& one, int64_t r, int64_t* chosen_out,
                   int64_t* out_idx, float* out_score, TwoStageScratch& w) {
  const int64_t g = in.g, d = in.d, m1 = one.chunks, i = r / in.h;
  w.dots.resize(g * m1), w.low.resize(g * m1), w.logits.resize(g * m1);
  const bool* ok1 = one.chunk_ok + i * m1;
  const Int8Rows bounds{row_of(one.smax, r), row_of(one.smin, r), one.bound_stride,
                        one.sscale + i * one.s0 + (r % in.h) * one.s1, ok1};
  row_logits(in.q, r, g, d, bounds, 0, m1, in.fs, w.dots.data(), w.low.data(), m1, w.logits.data(), m1);
  {
    const at::Tensor lp = log_softmax_rows(w.logits.data(), g, m1);
    w.score.resize(std::max(one.first, in.kc));
    top_row(lp.data_ptr<float>(), g, m1, ok1, nullptr, one.first, chosen_out, w.score.data(), w.top);
  }
  stage_two_row(in, r, chosen_out, one.first, nullptr, out_idx, out_score, w);
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
  const StageTwoInputs in = stage_two_inputs(qi, q, keys, scales, rpos, stored, chunk, kc, scale);
  const StageOneInputs one{chunks, first, smin, smax, smax.stride(2), sscale.data_ptr<float>(), sscale.stride(0),
                           sscale.stride(1), chunk_ok.get()};
  std::vector<int64_t> chosen(b * h * first);
  at::Tensor out_idx = at::empty({b, h, kc}, nn.options());
  at::Tensor out_score = at::empty({b, h, kc}, q.options().dtype(at::kFloat));
  int64_t* oi = out_idx.data_ptr<int64_t>();
  float* os = out_score.data_ptr<float>();
  at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
    TwoStageScratch w;
    for (int64_t r = begin; r < end; ++r)
      two_stage_row(in, one, r, chosen.data() + r * first, oi + r * kc, os + r * kc, w);
  });
  int32_t* cand_p = cand.data_ptr<int32_t>();
  for (int64_t r = 0; r < b * h; ++r)
    for (int64_t j = 0; j < first; ++j)
      cand_p[(r / h) * cand.stride(0) + (r % h) * cand.stride(1) + j] = static_cast<int32_t>(chosen[r * first + j]);
  return {out_idx, out_score};
}

// Stage two alone, between refreshes (selection.candidate_top over the tokens of the chunks chosen last and the
// latest, ties to the lower reserve index): chunks [b, h, nc] chunk indices; fresh [b, h, nc] bool (false: a
// repeated chunk, left out) or empty; keys, scales, rpos the whole reserve -> (reserve indices, scores) [b, h, kc].
std::tuple<at::Tensor, at::Tensor> candidate_top_int8(const at::Tensor& q, const at::Tensor& keys,
                                                      const at::Tensor& scales, const at::Tensor& chunks,
                                                      const at::Tensor& rpos, const at::Tensor& n,
                                                      const at::Tensor& fresh, int64_t chunk, int64_t kc, double scale) {
  check_reserve(keys, scales, rpos);
  const int64_t b = q.size(0), h = q.size(1);
  TORCH_CHECK(chunks.dim() == 3 && chunks.size(0) == b && chunks.size(1) == h, "chunks: [b, h, nc]");
  const int64_t nc = chunks.size(2);
  TORCH_CHECK(kc <= nc * chunk && keys.size(3) == q.size(3), "kc above the candidates");
  const bool has_fresh = fresh.defined() && fresh.numel() > 0;
  TORCH_CHECK(!has_fresh || (fresh.scalar_type() == at::kBool && fresh.sizes() == chunks.sizes()),
              "fresh: [b, h, nc] bool or empty");
  const at::Tensor cs = chunks.to(at::kLong).contiguous(), nn = n.to(at::kLong).contiguous();
  const at::Tensor fr = has_fresh ? fresh.contiguous() : fresh;
  const int64_t* cs_p = cs.data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(cs_p, cs_p + cs.numel());
  TORCH_CHECK(cs.numel() == 0 || (*lo >= 0 && (*hi + 1) * chunk <= keys.size(2)), "chunks: within the reserve");
  const Int16Query qi(q, false);
  const StageTwoInputs in = stage_two_inputs(qi, q, keys, scales, rpos, nn.data_ptr<int64_t>(), chunk, kc, scale);
  at::Tensor out_idx = at::empty({b, h, kc}, nn.options());
  at::Tensor out_score = at::empty({b, h, kc}, q.options().dtype(at::kFloat));
  const bool* fr_p = has_fresh ? fr.data_ptr<bool>() : nullptr;
  int64_t* oi = out_idx.data_ptr<int64_t>();
  float* os = out_score.data_ptr<float>();
  at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
    TwoStageScratch w;
    for (int64_t r = begin; r < end; ++r)
      stage_two_row(in, r, cs_p + r * nc, nc, fr_p ? fr_p + r * nc : nullptr, oi + r * kc, os + r * kc, w);
  });
  return {out_idx, out_score};
}

}  // namespace

TORCH_LIBRARY_IMPL(slam_cpu, CPU, m) {
  m.impl("two_stage_top_int8", &two_stage_top_int8);
  m.impl("candidate_top_int8", &candidate_top_int8);
}
