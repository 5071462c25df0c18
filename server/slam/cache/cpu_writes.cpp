// Slam's cache writes on the CPU, one call per layer each (cache/cpu_kernels.py builds this file with
// cpu_kernels.cpp, which declares the ops): the placement of chosen reserve rows into the critical columns,
// the reserve append of each slot's evicted token, and the chunk bounds' update. Each gives exactly what the
// torch code it replaces gives (tests/test_cpu_kernels.py). The appends run serially (a row each, too cheap
// to wake the intra-op threads for); the placement's rows spread over them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr float kNone = -std::numeric_limits<float>::infinity();

template <typename T>
void place_rows(const int64_t* idx, const float* score, const int64_t* rpos, const T* rk, const T* rv, T* k, T* v,
                int64_t* pos, int64_t* ridx, const int64_t* col, int64_t* churn, int64_t b, int64_t h, int64_t kc,
                int64_t d, int64_t rows, int64_t cols, int64_t budget) {
  // The picks' rows lie anywhere in a reserve far larger than the caches: each row's first touch would
  // wait on memory, so the rows a few picks ahead are requested while this one is copied.
  constexpr int64_t kAhead = 8;
  const int64_t lines = std::max<int64_t>(1, d * int64_t(sizeof(T)) / 64);
  // Rows over the intra-op threads: each waits on memory, so two threads hide each other's waits.
  at::parallel_for(0, b * h, 1, [&](int64_t first, int64_t last) {
  // where[t]: the column holding reserve token t, -1 for none. It spans the reserve, so it lives on across
  // calls and only the entries a row set are cleared after it.
  thread_local std::vector<int32_t> where;
  if (int64_t(where.size()) < rows) where.resize(rows, -1);
  std::vector<int64_t> newcomers, open;
  std::vector<char> keep(cols);
  for (int64_t row = first; row < last; ++row) {
    const int64_t slot = row / h;
    const int64_t* c = col + row * kc;
    const int64_t* r = idx + row * kc;
    const float* sc = score + row * kc;
    int64_t* rid = ridx + row * cols;
    int64_t* p = pos + row * cols;
    const T* rk_row = rk + row * rows * d;
    const T* rv_row = rv + row * rows * d;
    // A token chosen again keeps its column (slam.keep_columns): only newcomers are copied, into the columns
    // of tokens that left, in pick order; columns left over are emptied.
    newcomers.clear(), open.clear();
    std::fill(keep.begin(), keep.end(), 0);
    for (int64_t j = 0; j < kc; ++j) {  // a token in two columns (never in a running pool): the first holds it
      const int64_t t = c[j] < budget ? rid[c[j]] : -1;
      if (t >= 0 && t < rows && where[t] < 0) where[t] = int32_t(c[j]);
    }
    for (int64_t j = 0; j < kc; ++j) {
      if (c[j] >= budget || !(sc[j] > kNone)) continue;
      if (where[r[j]] >= 0) keep[where[r[j]]] = 1;
      else newcomers.push_back(r[j]);
    }
    for (int64_t j = 0; j < kc; ++j) {
      if (c[j] >= budget) continue;
      if (rid[c[j]] >= 0 && rid[c[j]] < rows) where[rid[c[j]]] = -1;
      if (!keep[c[j]]) open.push_back(c[j]);
    }
    const size_t placed = std::min(newcomers.size(), open.size());
    for (size_t i = 0; i < placed; ++i) {
      if (i + kAhead < placed) {
        for (int64_t l = 0; l < lines; ++l) {
          __builtin_prefetch(reinterpret_cast<const char*>(rk_row + newcomers[i + kAhead] * d) + 64 * l);
          __builtin_prefetch(reinterpret_cast<const char*>(rv_row + newcomers[i + kAhead] * d) + 64 * l);
        }
      }
      const int64_t t = newcomers[i], to = open[i];
      std::copy_n(rk_row + t * d, d, k + (row * cols + to) * d);
      std::copy_n(rv_row + t * d, d, v + (row * cols + to) * d);
      p[to] = rpos[slot * rows + t];
      rid[to] = t;
    }
    for (size_t i = placed; i < open.size(); ++i) p[open[i]] = rid[open[i]] = -1;
    churn[row] = int64_t(placed);
  }
  });
}

// Columns col [b, h, kc] of slots [0, b) take reserve rows idx [b, h, kc] of rk, rv [slots, h, rows, d] into
// k, v [slots, h, cols, d] with their positions (rpos [slots, rows]) and reserve indices into pos, ridx
// [slots, h, cols]; where score is -inf nothing was found. Picks the real columns (below `budget`) already hold
// stay where they are; the others fill the rest of those columns in pick order, and what is left over is
// emptied (position and index -1). Returns the churn per
// slot [b]: found picks bound for real columns (below `budget`) that none of those columns held before.
at::Tensor place(const at::Tensor& idx, const at::Tensor& score, const at::Tensor& rpos, const at::Tensor& rk,
                 const at::Tensor& rv, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                 const at::Tensor& ridx, const at::Tensor& col, int64_t budget) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&rk, &rv, &k, &v, &pos, &ridx, &rpos})
    TORCH_CHECK(t->is_contiguous(), "place: pool tensors must be contiguous");
  TORCH_CHECK(rk.scalar_type() == k.scalar_type() && rv.scalar_type() == v.scalar_type(), "place: reserve dtype");
  const int64_t b = idx.size(0), h = idx.size(1), kc = idx.size(2), d = k.size(3);
  const at::Tensor i = idx.contiguous(), s = score.contiguous(), c = col.contiguous();
  at::Tensor churn = at::zeros({b, h}, idx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "place", [&] {
    place_rows<scalar_t>(i.data_ptr<int64_t>(), s.data_ptr<float>(), rpos.data_ptr<int64_t>(),
                         rk.data_ptr<scalar_t>(), rv.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                         v.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), ridx.data_ptr<int64_t>(),
                         c.data_ptr<int64_t>(), churn.data_ptr<int64_t>(), b, h, kc, d, rk.size(2), k.size(2),
                         budget);
  });
  return churn.sum(1);
}

// The ring write (engine/ring.py's GPU kernel, model_runner.ring_write's indexing): slot i of [0, b) trades
// the token in column write[i] of each KV head for kn, vn [b, h, d] at position newpos[i] (-1 where not
// active) with score 0. k, v [slots, h, cols, d], pos, score [slots, h, cols]: the layer's pool tensors.
// Returns what the columns held: keys and values [b, h, d], positions [b, h], scores [b, h].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ring_write(
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos, const at::Tensor& score, const at::Tensor& write,
    const at::Tensor& newpos, const at::Tensor& active, const at::Tensor& kn, const at::Tensor& vn) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v, &pos, &score})
    TORCH_CHECK(t->is_contiguous(), "ring_write: pool tensors must be contiguous");
  TORCH_CHECK(kn.scalar_type() == k.scalar_type() && vn.scalar_type() == v.scalar_type(), "ring_write: dtype");
  TORCH_CHECK(pos.scalar_type() == at::kLong && score.scalar_type() == at::kFloat, "ring_write: pos, score dtype");
  const at::Tensor kc = kn.contiguous(), vc = vn.contiguous();
  const at::Tensor w = write.to(at::kLong).contiguous(), np = newpos.to(at::kLong).contiguous();
  const at::Tensor act = active.to(at::kBool).contiguous();
  const int64_t b = kc.size(0), h = kc.size(1), d = kc.size(2), cols = k.size(2);
  at::Tensor ek = at::empty_like(kc), ev = at::empty_like(vc);
  at::Tensor epos = at::empty({b, h}, pos.options()), escore = at::empty({b, h}, score.options());
  int64_t* pos_p = pos.data_ptr<int64_t>();
  float* score_p = score.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "ring_write", [&] {
    scalar_t* k_p = k.data_ptr<scalar_t>();
    scalar_t* v_p = v.data_ptr<scalar_t>();
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j < h; ++j) {
        const int64_t row = i * h + j, at = row * cols + w.data_ptr<int64_t>()[i];
        std::copy_n(k_p + at * d, d, ek.data_ptr<scalar_t>() + row * d);
        std::copy_n(v_p + at * d, d, ev.data_ptr<scalar_t>() + row * d);
        epos.data_ptr<int64_t>()[row] = pos_p[at];
        escore.data_ptr<float>()[row] = score_p[at];
        std::copy_n(kc.data_ptr<scalar_t>() + row * d, d, k_p + at * d);
        std::copy_n(vc.data_ptr<scalar_t>() + row * d, d, v_p + at * d);
        pos_p[at] = act.data_ptr<bool>()[i] ? np.data_ptr<int64_t>()[i] : -1;
        score_p[at] = 0.0f;
      }
  });
  return {ek, ev, epos, escore};
}

// Appending each slot's evicted token to its reserve (slam.on_evict through pool.reserve_write): the keys
// and values, and the int8 scoring copy of the key with its bfloat16 scale (engine/pool.quantize_rows, the
// same arithmetic: a row's scale is its largest magnitude times 1/127, rounded to bfloat16, and the key is
// divided by it and rounded half to even). rk, rv: [slots, h, rows, d]; rq: [slots, h, rows, d] int8 or
// empty; rq_scale: [slots, h, rows] bfloat16; at: [b] reserve index (the scratch index for slots that append
// nothing); k, v: [b, h, d] in the reserve's dtype.
template <typename T>
void append_rows(T* rk, T* rv, int8_t* rq, c10::BFloat16* rq_scale, const int64_t* at, const T* k, const T* v,
                 int64_t b, int64_t h, int64_t rows, int64_t d) {
  for (int64_t i = 0; i < b; ++i) {
    for (int64_t j = 0; j < h; ++j) {
      const int64_t row = (i * h + j) * rows + at[i];
      const T* kr = k + (i * h + j) * d;
      std::copy_n(kr, d, rk + row * d);
      std::copy_n(v + (i * h + j) * d, d, rv + row * d);
      if (rq == nullptr) continue;
      float largest = 0.0f;
      for (int64_t t = 0; t < d; ++t) largest = std::max(largest, std::abs(static_cast<float>(kr[t])));
      const c10::BFloat16 s(std::max(largest, 1e-8f) * (1.0f / 127.0f));
      const float sf = static_cast<float>(s);
      for (int64_t t = 0; t < d; ++t)
        rq[row * d + t] = static_cast<int8_t>(std::min(std::max(std::nearbyint(static_cast<float>(kr[t]) / sf), -127.0f), 127.0f));
      rq_scale[row] = s;
    }
  }
}

void reserve_append(const at::Tensor& rk, const at::Tensor& rv, const at::Tensor& rq, const at::Tensor& rq_scale,
                    const at::Tensor& at, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&rk, &rv})
    TORCH_CHECK(t->is_contiguous(), "reserve_append: reserve tensors must be contiguous");
  TORCH_CHECK(k.scalar_type() == rk.scalar_type() && v.scalar_type() == rv.scalar_type(), "reserve_append: dtype");
  const bool int8 = rq.defined() && rq.numel() > 0;
  TORCH_CHECK(!int8 || (rq.is_contiguous() && rq_scale.is_contiguous() && rq_scale.scalar_type() == at::kBFloat16),
              "reserve_append: int8 copies");
  const at::Tensor kc = k.contiguous(), vc = v.contiguous(), a = at.to(at::kLong).contiguous();
  const int64_t b = kc.size(0), h = kc.size(1), d = kc.size(2), rows = rk.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rk.scalar_type(), "reserve_append", [&] {
    append_rows<scalar_t>(rk.data_ptr<scalar_t>(), rv.data_ptr<scalar_t>(), int8 ? rq.data_ptr<int8_t>() : nullptr,
                          int8 ? rq_scale.data_ptr<c10::BFloat16>() : nullptr, a.data_ptr<int64_t>(),
                          kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), b, h, rows, d);
  });
}

// Folding each slot's new scoring key into its chunk's int8 bounds (engine/bounds.summarize_append, the same
// float operations in the same order): the chunk's first token sets them; a later one widens them, and when
// the chunk's scale grows, the stored bounds are requantized outward. smin, smax: [slots, h, chunks, d] int8;
// sscale: [slots, h, chunks] float32; at: [b] reserve index; keys: [b, h, d]; `mult`: bounds.OUTWARD / 127.
void summarize_append(const at::Tensor& smin, const at::Tensor& smax, const at::Tensor& sscale, const at::Tensor& at,
                      const at::Tensor& keys, int64_t chunk, double mult) {
  TORCH_CHECK(smin.is_contiguous() && smax.is_contiguous() && sscale.is_contiguous(), "bounds must be contiguous");
  const at::Tensor k = keys.to(at::kFloat).contiguous(), a = at.to(at::kLong).contiguous();
  const int64_t b = k.size(0), h = k.size(1), d = k.size(2), chunks = smin.size(2);
  const float m = static_cast<float>(mult);
  int8_t* lo = smin.data_ptr<int8_t>();
  int8_t* hi = smax.data_ptr<int8_t>();
  float* sc = sscale.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  for (int64_t i = 0; i < b; ++i) {
    const int64_t c = a.data_ptr<int64_t>()[i] / chunk;
    const bool first = a.data_ptr<int64_t>()[i] % chunk == 0;
    for (int64_t j = 0; j < h; ++j) {
      const float* x = kp + (i * h + j) * d;
      const int64_t at_c = (i * h + j) * chunks + c;
      float largest = 0.0f;
      for (int64_t t = 0; t < d; ++t) largest = std::max(largest, std::abs(x[t]));
      const float kmax = std::max(largest, 1e-30f) * m;
      const float old_s = sc[at_c];
      const float s = first ? kmax : std::max(old_s, kmax);
      const bool keep = !first && s == old_s;
      for (int64_t t = 0; t < d; ++t) {
        const float l_new = std::floor(x[t] / s), h_new = std::ceil(x[t] / s);
        const float l_old = lo[at_c * d + t], h_old = hi[at_c * d + t];
        const float l = first ? l_new : keep ? std::min(l_old, l_new) : std::floor(std::min(l_old * old_s, x[t]) / s);
        const float u = first ? h_new : keep ? std::max(h_old, h_new) : std::ceil(std::max(h_old * old_s, x[t]) / s);
        lo[at_c * d + t] = static_cast<int8_t>(std::min(std::max(l, -127.0f), 127.0f));
        hi[at_c * d + t] = static_cast<int8_t>(std::min(std::max(u, -127.0f), 127.0f));
      }
      sc[at_c] = s;
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(slam_cpu, CPU, m) {
  m.impl("place", &place);
  m.impl("ring_write", &ring_write);
  m.impl("reserve_append", &reserve_append);
  m.impl("summarize_append", &summarize_append);
}
