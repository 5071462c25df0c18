// Slam's selection on the CPU, one call per layer each (cache/cpu_kernels.py builds this file with
// cpu_writes.cpp; this one declares every op). The torch code they replace (selection.py, slam.place, the
// pool's appends) runs about sixty small ops per layer, each paying dispatch and, when OpenMP's threads
// sleep between ops, a thread wake-up. Every function gives exactly what the torch code gives.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr float kNone = -std::numeric_limits<float>::infinity();

// A float's bits as an unsigned integer in the float's order (-0.0 taken as 0.0, as comparisons take it).
inline uint32_t ordered_bits(float f) {
  if (f == 0.0f) f = 0.0f;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

using Pick = std::pair<uint64_t, int64_t>;  // (ordering key, position)

struct Scratch {
  std::vector<float> s;
  std::vector<int32_t> hist;
  std::vector<Pick> pick;
};

constexpr int64_t kBins = 1024;

// The kc best of one row of reserve tokens: x [g, m] log-probabilities of the group's queries, ok [m] stored,
// tie [m] tie keys (nullptr: positions) -> positions and scores, best first. A token's score is its maximum
// over the group, -inf where not stored; equal scores rank by lower tie key, as top_by_index does.
void top_row(const float* x, int64_t g, int64_t m, const bool* ok, const int64_t* tie, int64_t kc, int64_t* idx,
             float* score, Scratch& w) {
  if (kc == 0) return;
  std::vector<float>& s = w.s;
  s.assign(x, x + m);
  for (int64_t j = 1; j < g; ++j)  // the group's maximum, query by query: contiguous, vectorizable
    for (int64_t i = 0; i < m; ++i) s[i] = std::max(s[i], x[j * m + i]);
  for (int64_t i = 0; i < m; ++i)
    if (!ok[i]) s[i] = kNone;
  // Only scores that can reach the kc best are ranked with their tie keys. A histogram of the finite scores
  // over their range finds the bin holding the kc-th best: every score of a higher bin is strictly higher
  // than every score of a lower one, since the bin is monotonic in the score.
  float lo = std::numeric_limits<float>::infinity(), hi = kNone;
  int64_t finite = 0;
  for (int64_t i = 0; i < m; ++i) {  // branch-free, so that it vectorizes
    const bool f = s[i] > kNone;
    lo = std::min(lo, f ? s[i] : lo);
    hi = std::max(hi, s[i]);
    finite += f;
  }
  const float inv = kBins / (hi - lo);
  auto bin = [&](float v) {
    const float x = (v - lo) * inv;
    return x >= 0.0f ? (x < kBins ? int64_t(x) : kBins - 1) : int64_t(0);  // NaN and overflow to the ends
  };
  int64_t cut = 0;
  const bool binned = finite > kc && hi > lo;
  if (binned) {
    w.hist.assign(kBins, 0);
    for (int64_t i = 0; i < m; ++i)
      if (s[i] > kNone) ++w.hist[bin(s[i])];
    for (int64_t total = 0, b = kBins - 1; b >= 0; --b)
      if ((total += w.hist[b]) >= kc) {
        cut = b;
        break;
      }
  }
  w.pick.clear();
  for (int64_t i = 0; i < m; ++i) {
    // One integer orders the picks: the score's bits made monotonic (high word), then the lower tie key
    // first (low word). Tie keys are reserve indices or positions, below 2^32.
    if (!binned || (s[i] > kNone && bin(s[i]) >= cut))
      w.pick.push_back({(uint64_t(ordered_bits(s[i])) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(tie ? tie[i] : i)), i});
  }
  auto better = [](const Pick& a, const Pick& c) { return a.first > c.first; };
  std::nth_element(w.pick.begin(), w.pick.begin() + (kc - 1), w.pick.end(), better);
  std::sort(w.pick.begin(), w.pick.begin() + kc, better);
  for (int64_t j = 0; j < kc; ++j) {
    idx[j] = w.pick[j].second;
    score[j] = s[w.pick[j].second];
  }
}

// Each row's top_row: lp [b, h, g, m] log-probabilities, ok [b, 1 or h, m] stored, tie [b, h, m] or nullptr ->
// idx, score [b, h, kc]. Rows spread over the intra-op threads when they are long or many: a row of a
// thousand scores is worth a thread's wake-up, a few short ones are not.
void top_rows(const at::Tensor& lp, const at::Tensor& ok, const int64_t* tie, int64_t kc, int64_t* idx,
              float* score) {
  const int64_t rows = lp.size(0) * lp.size(1), g = lp.size(2), m = lp.size(3), per_slot = lp.size(1);
  const float* x = lp.data_ptr<float>();
  const bool* ok_p = ok.data_ptr<bool>();
  const bool per_row = ok.size(1) != 1;
  at::parallel_for(0, rows, m >= 1024 ? 1 : 4, [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t r = begin; r < end; ++r)
      top_row(x + r * g * m, g, m, ok_p + (per_row ? r : r / per_slot) * m, tie ? tie + r * m : nullptr, kc,
              idx + r * kc, score + r * kc, w);
  });
}

// t[i][j] of a tensor [b, h, ...] as a view made without the dispatcher (two select calls cost about as
// much as a small row's product).
at::Tensor part(const at::Tensor& t, int64_t i, int64_t j) {
  const auto sizes = t.sizes().slice(2), strides = t.strides().slice(2);
  return at::from_blob(static_cast<char*>(t.data_ptr()) + (i * t.stride(0) + j * t.stride(1)) * t.element_size(),
                       sizes, strides, t.options());
}

// The int8 product of each row (slot i, KV head j) of [b, h, ...] activations a, int8 weights w and their
// scales s: _weight_int8pack_mm(a[i][j], w[i][j], s[i][j]), in row order. With at least two rows per thread
// the rows spread over the threads, each product then running on one; with fewer, each product spreads over
// the threads itself. Either way a product's values are the same (its reduction is per output).
std::vector<at::Tensor> row_products(const at::Tensor& a, const at::Tensor& w, const at::Tensor& s) {
  const int64_t h = w.size(1), rows = w.size(0) * h;
  std::vector<at::Tensor> out(rows);
  auto product = [&](int64_t r) {
    out[r] = at::_weight_int8pack_mm(part(a, r / h, r % h), part(w, r / h, r % h), part(s, r / h, r % h));
  };
  if (rows >= 2 * at::get_num_threads()) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) product(r);
    });
  } else {
    for (int64_t r = 0; r < rows; ++r) product(r);
  }
  return out;
}

// The torch code's scaled, masked log-softmax of int8 products, in its arithmetic (the values must match it bit
// for bit): per row (slot, KV head) one [g, m] bfloat16 product, or the sum of two (`second`, chunk bounds),
// in float32 times float32(scale), -inf where ok [b, 1 or h, m] is False; then aten's log-softmax. One pass
// in place of the stack, conversion, scaling and mask the torch code runs as separate ops.
at::Tensor masked_log_softmax(const std::vector<at::Tensor>& dots, const std::vector<at::Tensor>& second,
                              const at::Tensor& ok, int64_t b, int64_t h, int64_t g, int64_t m, double scale) {
  at::Tensor logits = at::empty({b, h, g, m}, ok.options().dtype(at::kFloat));
  float* out = logits.data_ptr<float>();
  const bool* ok_p = ok.data_ptr<bool>();
  const bool per_row = ok.size(1) != 1;
  const float fs = static_cast<float>(scale);
  at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const c10::BFloat16* d1 = dots[row].data_ptr<c10::BFloat16>();
      const c10::BFloat16* d2 = second.empty() ? nullptr : second[row].data_ptr<c10::BFloat16>();
      const bool* okr = ok_p + (per_row ? row : row / h) * m;
      for (int64_t j = 0; j < g; ++j) {
        float* o = out + (row * g + j) * m;
        for (int64_t i = 0; i < m; ++i) {
          float x = static_cast<float>(d1[j * m + i]);
          if (d2) x += static_cast<float>(d2[j * m + i]);
          o[i] = okr[i] ? x * fs : kNone;
        }
      }
    }
  });
  return at::log_softmax(logits, -1).contiguous();
}

// logp: [b, h, g, m] float32 log-probabilities; stored: [b, 1 or h, m] bool; order: [b, h, m] int64 tie
// keys, or an empty tensor (ties by position) -> (positions, scores) [b, h, kc], best first (top_row).
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
  top_rows(lp, st, keyed ? ord.data_ptr<int64_t>() : nullptr, kc, out_idx.data_ptr<int64_t>(),
           out_score.data_ptr<float>());
  return {out_idx, out_score};
}

// The int8 ops below compute what the torch code computes with the same aten kernels, so the values are the
// same: the int8 products one row (a slot's KV head) at a time (row_products), then masked_log_softmax over all
// rows at once, then top_rows.

// Exact selection from int8 scoring keys in one call: selection.dot_int8 then exact_top (ties by position).
// q: [b, h, g, d]; keys: [b, h, m, d] int8, each head's rows contiguous; scales: [b, h, m] bfloat16;
// rpos: [b, m] positions (-1: nothing stored); n: [b] tokens stored -> (positions, scores) [b, h, kc].
std::tuple<at::Tensor, at::Tensor> exact_top_int8(const at::Tensor& q, const at::Tensor& keys,
                                                  const at::Tensor& scales, const at::Tensor& rpos,
                                                  const at::Tensor& n, int64_t kc, double scale) {
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kChar, "keys: [b, h, m, d] int8");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && rpos.scalar_type() == at::kLong, "scales, rpos");
  const int64_t b = keys.size(0), h = keys.size(1), m = keys.size(2), g = q.size(2);
  TORCH_CHECK(kc <= m, "kc above the reserve");
  const at::Tensor qb = q.to(at::kBFloat16).contiguous(), nn = n.to(at::kLong).contiguous();
  const std::vector<at::Tensor> dots = row_products(qb, keys, scales);
  at::Tensor ok = at::empty({b, 1, m}, rpos.options().dtype(at::kBool));
  bool* ok_p = ok.data_ptr<bool>();
  const int64_t* rpos_p = rpos.data_ptr<int64_t>();
  const int64_t slot_stride = rpos.stride(0), index_stride = rpos.stride(1);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t stored = nn.data_ptr<int64_t>()[i];
    for (int64_t t = 0; t < m; ++t) ok_p[i * m + t] = t < stored && rpos_p[i * slot_stride + t * index_stride] >= 0;
  }
  const at::Tensor lp = masked_log_softmax(dots, {}, ok, b, h, g, m, scale);
  at::Tensor out_idx = at::empty({b, h, kc}, rpos.options());
  at::Tensor out_score = at::empty({b, h, kc}, q.options().dtype(at::kFloat));
  top_rows(lp, ok, nullptr, kc, out_idx.data_ptr<int64_t>(), out_score.data_ptr<float>());
  return {out_idx, out_score};
}

// Stage one of two-stage selection from int8 bounds in one call: selection.chunk_top_int8 (ties to the
// lower chunk index). q: [b, h, g, d]; smin, smax: [b, h, chunks, d] int8, each head's rows contiguous;
// sscale: [b, h, chunks] float32; n: [b] tokens stored -> chunk indices [b, h, first], best first.
at::Tensor chunk_top_int8(const at::Tensor& q, const at::Tensor& smin, const at::Tensor& smax,
                          const at::Tensor& sscale, const at::Tensor& n, int64_t first, int64_t chunk, double scale) {
  TORCH_CHECK(smin.scalar_type() == at::kChar && smax.scalar_type() == at::kChar, "bounds: int8");
  const int64_t b = smin.size(0), h = smin.size(1), chunks = smin.size(2), g = q.size(2);
  TORCH_CHECK(first <= chunks, "first above the chunks");
  const at::Tensor qb = q.to(at::kBFloat16), s16 = sscale.to(at::kBFloat16);
  const at::Tensor plus = qb.clamp_min(0), minus = qb.clamp_max(0), nn = n.to(at::kLong).contiguous();
  const std::vector<at::Tensor> upper = row_products(plus, smax, s16), lower = row_products(minus, smin, s16);
  at::Tensor ok = at::empty({b, 1, chunks}, nn.options().dtype(at::kBool));
  bool* ok_p = ok.data_ptr<bool>();
  for (int64_t i = 0; i < b; ++i)
    for (int64_t c = 0; c < chunks; ++c) ok_p[i * chunks + c] = c * chunk < nn.data_ptr<int64_t>()[i];
  const at::Tensor lp = masked_log_softmax(upper, lower, ok, b, h, g, chunks, scale);
  at::Tensor out = at::empty({b, h, first}, nn.options());
  at::Tensor score = at::empty({b, h, first}, q.options().dtype(at::kFloat));
  top_rows(lp, ok, nullptr, first, out.data_ptr<int64_t>(), score.data_ptr<float>());
  return out;
}

// Stage two of two-stage selection from int8 scoring keys in one call: pool.scoring_int8_rows's gathers,
// selection.dot_int8 and candidate_top (ties by lower reserve index). q: [b, h, g, d]; keys: [slots, h,
// rows, d] int8 and scales [slots, h, rows] (bfloat16, or float32 rounded to bfloat16 as the torch code
// rounds them), the whole reserve; idx: [b, h, c] candidate reserve indices; rpos: [slots, rows]; n: [b];
// fresh: [b, h, c] bool or empty (False: a repeat, skipped) -> (reserve indices, scores) [b, h, kc].
std::tuple<at::Tensor, at::Tensor> candidate_top_int8(const at::Tensor& q, const at::Tensor& keys,
                                                      const at::Tensor& scales, const at::Tensor& idx,
                                                      const at::Tensor& rpos, const at::Tensor& n,
                                                      const at::Tensor& fresh, int64_t kc, double scale) {
  TORCH_CHECK(keys.dim() == 4 && keys.scalar_type() == at::kChar && keys.is_contiguous(), "keys: int8 reserve");
  TORCH_CHECK(scales.is_contiguous() && rpos.is_contiguous() && rpos.scalar_type() == at::kLong, "scales, rpos");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 || scales.scalar_type() == at::kFloat, "scales dtype");
  const int64_t b = idx.size(0), h = idx.size(1), c = idx.size(2), rows = keys.size(2), d = keys.size(3);
  const int64_t g = q.size(2);
  TORCH_CHECK(kc <= c, "kc above the candidates");
  const at::Tensor qb = q.to(at::kBFloat16).contiguous(), ix = idx.to(at::kLong).contiguous();
  const at::Tensor nn = n.to(at::kLong).contiguous();
  const bool has_fresh = fresh.defined() && fresh.numel() > 0;
  const at::Tensor fr = has_fresh ? fresh.contiguous() : fresh;
  at::Tensor kb = at::empty({b, h, c, d}, keys.options());
  at::Tensor sb = at::empty({b, h, c}, keys.options().dtype(at::kBFloat16));
  at::Tensor ok = at::empty({b, h, c}, keys.options().dtype(at::kBool));
  const bool bf16 = scales.scalar_type() == at::kBFloat16;
  const int8_t* keys_p = keys.data_ptr<int8_t>();
  const c10::BFloat16* s16_p = bf16 ? scales.data_ptr<c10::BFloat16>() : nullptr;
  const float* s32_p = bf16 ? nullptr : scales.data_ptr<float>();
  const bool* fr_p = has_fresh ? fr.data_ptr<bool>() : nullptr;
  const int64_t* rpos_p = rpos.data_ptr<int64_t>();
  const int64_t* ix_p = ix.data_ptr<int64_t>();
  int8_t* kb_p = kb.data_ptr<int8_t>();
  c10::BFloat16* sb_p = sb.data_ptr<c10::BFloat16>();
  bool* ok_p = ok.data_ptr<bool>();
  // The gathers, rows over the threads: each reads candidates scattered through a reserve far larger than the
  // caches, so two threads hide each other's waits on memory.
  at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row / h, stored = nn.data_ptr<int64_t>()[i], base = row * rows;
      const int64_t* r = ix_p + row * c;
      const int64_t* rp = rpos_p + i * rpos.size(1);
      for (int64_t t = 0; t < c; ++t) {
        if (t + 16 < c) __builtin_prefetch(keys_p + (base + r[t + 16]) * d);  // as in place_rows
        std::memcpy(kb_p + (row * c + t) * d, keys_p + (base + r[t]) * d, d);
        sb_p[row * c + t] = bf16 ? s16_p[base + r[t]] : c10::BFloat16(s32_p[base + r[t]]);
        ok_p[row * c + t] = r[t] < stored && rp[r[t]] >= 0 && (!fr_p || fr_p[row * c + t]);
      }
    }
  });
  const std::vector<at::Tensor> dots = row_products(qb, kb, sb);
  const at::Tensor lp = masked_log_softmax(dots, {}, ok, b, h, g, c, scale);
  at::Tensor at_ = at::empty({b, h, kc}, ix.options());
  at::Tensor out_score = at::empty({b, h, kc}, q.options().dtype(at::kFloat));
  top_rows(lp, ok, ix_p, kc, at_.data_ptr<int64_t>(), out_score.data_ptr<float>());
  return {ix.gather(2, at_), out_score};
}

}  // namespace

TORCH_LIBRARY(slam_cpu, m) {
  m.def("group_top(Tensor logp, Tensor stored, int kc, Tensor order) -> (Tensor, Tensor)");
  m.def("exact_top_int8(Tensor q, Tensor keys, Tensor scales, Tensor rpos, Tensor n, int kc, float scale) "
        "-> (Tensor, Tensor)");
  m.def("chunk_top_int8(Tensor q, Tensor smin, Tensor smax, Tensor sscale, Tensor n, int first, int chunk, "
        "float scale) -> Tensor");
  m.def("candidate_top_int8(Tensor q, Tensor keys, Tensor scales, Tensor idx, Tensor rpos, Tensor n, Tensor fresh, "
        "int kc, float scale) -> (Tensor, Tensor)");
  m.def("reserve_append(Tensor(a!) rk, Tensor(b!) rv, Tensor(c!) rq, Tensor(d!) rq_scale, Tensor at, Tensor k, "
        "Tensor v) -> ()");
  m.def("summarize_append(Tensor(a!) smin, Tensor(b!) smax, Tensor(c!) sscale, Tensor at, Tensor keys, int chunk, "
        "float mult) -> ()");
  m.def("ring_write(Tensor(a!) k, Tensor(b!) v, Tensor(c!) pos, Tensor(d!) score, Tensor write, Tensor newpos, "
        "Tensor active, Tensor kn, Tensor vn) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("place(Tensor idx, Tensor score, Tensor rpos, Tensor rk, Tensor rv, Tensor(a!) k, Tensor(b!) v, "
        "Tensor(c!) pos, Tensor(d!) ridx, Tensor col, int budget) -> Tensor");
}

TORCH_LIBRARY_IMPL(slam_cpu, CPU, m) {
  m.impl("group_top", &group_top);
  m.impl("exact_top_int8", &exact_top_int8);
  m.impl("candidate_top_int8", &candidate_top_int8);
  m.impl("chunk_top_int8", &chunk_top_int8);
}
