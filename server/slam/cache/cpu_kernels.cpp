// Slam's selection on the CPU, one call per layer each (cache/cpu_kernels.py builds this file with the other
// cpu_*.cpp; this one declares every op). The torch code they replace (selection.py, slam.place, the
// pool's appends) runs about sixty small ops per layer, each paying dispatch and, when OpenMP's threads
// sleep between ops, a thread wake-up. Every function gives exactly what the torch code gives.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_rows.h"
#include "cpu_scores.h"
#include "cpu_top.h"

namespace {

using slam_rows::check_bounds;
using slam_rows::filled_chunks;
using slam_rows::Int16Query;
using slam_rows::Int8Rows;
using slam_rows::row_logits;
using slam_rows::row_of;
using slam_top::Scratch;
using slam_top::top_row;

// Each row's top_row: lp [b, h, g, m] log-probabilities, ok [b, 1 or h (per_row), m] stored, tie [b, h, m] or
// nullptr -> idx (tie keys, or positions), score [b, h, kc]. Rows spread over the intra-op threads when they are
// long or many: a row of five hundred scores is worth a thread's wake-up, a few short ones are not.
void top_rows(const at::Tensor& lp, const bool* ok, bool per_row, const int64_t* tie, int64_t kc, int64_t* idx,
              float* score) {
  const int64_t rows = lp.size(0) * lp.size(1), g = lp.size(2), m = lp.size(3), per_slot = lp.size(1);
  const float* x = lp.data_ptr<float>();
  at::parallel_for(0, rows, m >= 512 ? 1 : 4, [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t r = begin; r < end; ++r)
      top_row(x + r * g * m, g, m, ok + (per_row ? r : r / per_slot) * m, tie ? tie + r * m : nullptr, kc,
              idx + r * kc, score + r * kc, w);
  });
}

// Ranges each of `rows` rows is split into, so that the threads get at least two units each: one slot's three
// KV heads then use both of two threads.
int64_t parts_per_row(int64_t rows) {
  return std::max<int64_t>(1, (2 * at::get_num_threads() + rows - 1) / rows);
}

// Log-probabilities [b, h, g, m] of int8 rows: aten's log-softmax of the scaled, masked logits float(dot) *
// (query scale * key scale) * scale, -inf where not stored. q [b, h, g, d]; rows(r) gives row r = slot * h +
// head. The logits spread over the intra-op threads by row and by range of keys (parts_per_row).
template <typename Rows>
at::Tensor int8_log_probs(const at::Tensor& q, int64_t m, double scale, Rows rows) {
  const int64_t b = q.size(0), h = q.size(1), g = q.size(2), d = q.size(3);
  const bool bounds = rows(0).lower != nullptr;
  const Int16Query qi(q, bounds);
  at::Tensor logits = at::empty({b, h, g, m}, q.options().dtype(at::kFloat));
  float* out = logits.data_ptr<float>();
  const float fs = static_cast<float>(scale);
  const int64_t parts = parts_per_row(b * h);
  const int64_t span = ((m + parts - 1) / parts + 7) / 8 * 8;  // parts x span >= m
  at::parallel_for(0, b * h * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> dots(g * span), low(bounds ? g * span : 0);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit / parts, lo = std::min(m, unit % parts * span), hi = std::min(m, lo + span);
      row_logits(qi, r, g, d, rows(r), lo, hi, fs, dots.data(), low.data(), span, out + r * g * m, m);
    }
  });
  return at::log_softmax(logits, -1).contiguous();
}

// logp: [b, h, g, m] float32 log-probabilities; stored: [b, 1 or h, m] bool; order: [b, h, m] int64 tie
// keys below 2^32, or an empty tensor (ties by position) -> (the picks' tie keys, or positions, and scores)
// [b, h, kc], best first (top_row).
std::tuple<at::Tensor, at::Tensor> group_top(const at::Tensor& logp, const at::Tensor& stored, int64_t kc,
                                             const at::Tensor& order) {
  TORCH_CHECK(logp.dim() == 4 && logp.scalar_type() == at::kFloat, "logp: [b, h, g, m] float32");
  TORCH_CHECK(stored.dim() == 3 && stored.scalar_type() == at::kBool, "stored: [b, 1 or h, m] bool");
  const int64_t b = logp.size(0), h = logp.size(1), m = logp.size(3);
  TORCH_CHECK(kc <= m, "kc above the candidates");
  const at::Tensor lp = logp.contiguous(), st = stored.contiguous();
  const bool keyed = order.defined() && order.numel() > 0;
  const at::Tensor ord = keyed ? order.contiguous() : order;
  at::Tensor out_idx = at::empty({b, h, kc}, logp.options().dtype(at::kLong));
  at::Tensor out_score = at::empty({b, h, kc}, logp.options());
  top_rows(lp, st.data_ptr<bool>(), st.size(1) != 1, keyed ? ord.data_ptr<int64_t>() : nullptr, kc,
           out_idx.data_ptr<int64_t>(), out_score.data_ptr<float>());
  return {out_idx, out_score};
}

// The int8 ops below compute what the torch code computes (selection.dot_int8's integer arithmetic, then aten's
// log-softmax), so the values are the same: int8_log_probs over all rows, then top_rows.

// Exact selection from int8 scoring keys in one call: selection.dot_int8 then exact_top (ties by position).
// q: [b, h, g, d]; keys: [b, h, m, d] int8, rows contiguous; scales: [b, h, m] (bfloat16 or float32);
// rpos: [b, m] positions (-1: nothing stored); n: [b] tokens stored -> (positions, scores) [b, h, kc].
std::tuple<at::Tensor, at::Tensor> exact_top_int8(const at::Tensor& q, const at::Tensor& keys,
                                                  const at::Tensor& scales, const at::Tensor& rpos,
                                                  const at::Tensor& n, int64_t kc, double scale) {
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kChar && keys.stride(3) == 1, "keys: [b, h, m, d] int8");
  TORCH_CHECK(rpos.scalar_type() == at::kLong, "rpos: int64");
  const int64_t b = keys.size(0), h = keys.size(1), m = keys.size(2);
  TORCH_CHECK(kc <= m, "kc above the reserve");
  const at::Tensor nn = n.to(at::kLong).contiguous(), sf = scales.to(at::kFloat).contiguous();
  at::Tensor ok = at::empty({b, 1, m}, rpos.options().dtype(at::kBool));
  bool* ok_p = ok.data_ptr<bool>();
  const int64_t* rpos_p = rpos.data_ptr<int64_t>();
  const int64_t slot_stride = rpos.stride(0), index_stride = rpos.stride(1);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t stored = nn.data_ptr<int64_t>()[i];
    for (int64_t t = 0; t < m; ++t) ok_p[i * m + t] = t < stored && rpos_p[i * slot_stride + t * index_stride] >= 0;
  }
  const float* sf_p = sf.data_ptr<float>();
  const at::Tensor lp = int8_log_probs(q, m, scale, [&](int64_t r) {
    return Int8Rows{row_of(keys, r), nullptr, keys.stride(2), sf_p + r * m, ok_p + (r / h) * m};
  });
  at::Tensor out_idx = at::empty({b, h, kc}, rpos.options());
  at::Tensor out_score = at::empty({b, h, kc}, q.options().dtype(at::kFloat));
  top_rows(lp, ok_p, false, nullptr, kc, out_idx.data_ptr<int64_t>(), out_score.data_ptr<float>());
  return {out_idx, out_score};
}

// Stage one of two-stage selection from int8 bounds (selection.chunk_top_int8, ties to the lower chunk index):
// q [b, h, g, d]; smin, smax [>= b, h, >= chunks, d] int8, rows contiguous; sscale [>= b, h, >= chunks] float32,
// chunks contiguous; stored [b] tokens stored -> the `first` best of chunks [0, chunks) per row, best first, at
// chosen [b * h * first].
void stage_one(const at::Tensor& q, const at::Tensor& smin, const at::Tensor& smax, const at::Tensor& sscale,
               const int64_t* stored, int64_t chunks, int64_t first, int64_t chunk, double scale, int64_t* chosen) {
  check_bounds(smin, smax, sscale);
  const int64_t b = q.size(0), h = q.size(1);
  TORCH_CHECK(first <= chunks && chunks <= smin.size(2) && b <= smin.size(0), "chunks: first <= chunks <= bounds");
  const std::unique_ptr<bool[]> ok = filled_chunks(stored, b, chunks, chunk);
  const float* ss = sscale.data_ptr<float>();
  const int64_t s0 = sscale.stride(0), s1 = sscale.stride(1);
  const at::Tensor lp = int8_log_probs(q, chunks, scale, [&](int64_t r) {
    return Int8Rows{row_of(smax, r), row_of(smin, r), smax.stride(2), ss + (r / h) * s0 + (r % h) * s1,
                    ok.get() + (r / h) * chunks};
  });
  std::vector<float> score(b * h * first);
  top_rows(lp, ok.get(), false, nullptr, first, chosen, score.data());
}

// Stage one in one call: q [b, h, g, d]; smin, smax [b, h, chunks, d] int8, rows contiguous; sscale [b, h, chunks];
// n [b] tokens stored -> chunk indices [b, h, first], best first.
at::Tensor chunk_top_int8(const at::Tensor& q, const at::Tensor& smin, const at::Tensor& smax,
                          const at::Tensor& sscale, const at::Tensor& n, int64_t first, int64_t chunk, double scale) {
  const at::Tensor nn = n.to(at::kLong).contiguous();
  at::Tensor sf = sscale.to(at::kFloat);
  if (sf.stride(2) != 1) sf = sf.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), first}, nn.options());
  stage_one(q, smin, smax, sf, nn.data_ptr<int64_t>(), smin.size(2), first, chunk, scale, out.data_ptr<int64_t>());
  return out;
}

// The vector path of the integer scoring (cpu_scores.h's set_level): capped at `level` unless empty.
std::string scoring_level(c10::string_view level) {
  return slam_scores::set_level(std::string(level).c_str());
}

}  // namespace

TORCH_LIBRARY(slam_cpu, m) {
  m.def("scoring_level(str level) -> str");
  m.def("group_top(Tensor logp, Tensor stored, int kc, Tensor order) -> (Tensor, Tensor)");
  m.def("exact_top_int8(Tensor q, Tensor keys, Tensor scales, Tensor rpos, Tensor n, int kc, float scale) "
        "-> (Tensor, Tensor)");
  m.def("chunk_top_int8(Tensor q, Tensor smin, Tensor smax, Tensor sscale, Tensor n, int first, int chunk, "
        "float scale) -> Tensor");
  m.def("candidate_top_int8(Tensor q, Tensor keys, Tensor scales, Tensor chunks, Tensor rpos, Tensor n, "
        "Tensor fresh, int chunk, int kc, float scale) -> (Tensor, Tensor)");
  m.def("two_stage_top_int8(Tensor q, Tensor smin, Tensor smax, Tensor sscale, Tensor keys, Tensor scales, "
        "Tensor rpos, Tensor n, Tensor(a!) cand, int chunks, int first, int chunk, int kc, float scale) -> (Tensor, Tensor)");
  m.def("reserve_append(Tensor(a!) rk, Tensor(b!) rv, Tensor(c!) rq, Tensor(d!) rq_scale, Tensor at, Tensor k, "
        "Tensor v) -> ()");
  m.def("summarize_append(Tensor(a!) smin, Tensor(b!) smax, Tensor(c!) sscale, Tensor at, Tensor keys, int chunk, "
        "float mult) -> ()");
  m.def("ring_write(Tensor(a!) k, Tensor(b!) v, Tensor(c!) pos, Tensor(d!) score, Tensor write, Tensor newpos, "
        "Tensor active, Tensor kn, Tensor vn) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("decode_attend(Tensor q, Tensor k, Tensor v, Tensor valid, float scale) -> Tensor");
  m.def("place(Tensor idx, Tensor score, Tensor rpos, Tensor rk, Tensor rv, Tensor(a!) k, Tensor(b!) v, "
        "Tensor(c!) pos, Tensor(d!) ridx, Tensor col, int budget) -> Tensor");
}

TORCH_LIBRARY_IMPL(slam_cpu, CPU, m) {
  m.impl("group_top", &group_top);
  m.impl("exact_top_int8", &exact_top_int8);
  m.impl("chunk_top_int8", &chunk_top_int8);
}

TORCH_LIBRARY_IMPL(slam_cpu, CatchAll, m) { m.impl("scoring_level", &scoring_level); }
