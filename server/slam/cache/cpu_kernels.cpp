// Slam's selection tail and placement on the CPU, one call per layer each (cache/cpu_kernels.py builds
// this file). The torch versions (selection.top_by_index, slam.place) run about forty small ops per layer,
// each paying dispatch and, when OpenMP's threads sleep between ops, a thread wake-up. Both functions give
// exactly what the torch versions give. They run serially: a step has few rows, and waking the intra-op
// threads would cost more than the rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <unordered_set>
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

// logp: [b, h, g, m] float32 log-probabilities; stored: [b, 1 or h, m] bool; order: [b, h, m] int64 tie
// keys, or an empty tensor (ties by position) -> (positions, scores) [b, h, kc], best first. A score is the
// maximum over the group, -inf where not stored; equal scores rank by lower tie key, as top_by_index does.
std::tuple<at::Tensor, at::Tensor> group_top(const at::Tensor& logp, const at::Tensor& stored, int64_t kc,
                                             const at::Tensor& order) {
  TORCH_CHECK(logp.dim() == 4 && logp.scalar_type() == at::kFloat, "logp: [b, h, g, m] float32");
  TORCH_CHECK(stored.dim() == 3 && stored.scalar_type() == at::kBool, "stored: [b, 1 or h, m] bool");
  const int64_t b = logp.size(0), h = logp.size(1), g = logp.size(2), m = logp.size(3);
  TORCH_CHECK(kc <= m, "kc above the candidates");
  const at::Tensor lp = logp.contiguous(), st = stored.contiguous();
  const bool keyed = order.defined() && order.numel() > 0;
  const at::Tensor ord = keyed ? order.contiguous() : order;
  const int64_t st_heads = st.size(1);
  at::Tensor out_idx = at::empty({b, h, kc}, logp.options().dtype(at::kLong));
  at::Tensor out_score = at::empty({b, h, kc}, logp.options());
  const float* lp_p = lp.data_ptr<float>();
  const bool* st_p = st.data_ptr<bool>();
  const int64_t* ord_p = keyed ? ord.data_ptr<int64_t>() : nullptr;
  int64_t* idx_p = out_idx.data_ptr<int64_t>();
  float* score_p = out_score.data_ptr<float>();
  std::vector<float> s(m);
  std::vector<uint64_t> key(m);
  std::vector<int64_t> at(m);
  for (int64_t row = 0; row < b * h; ++row) {
    const int64_t slot = row / h, head = row % h;
    const bool* ok = st_p + (slot * st_heads + (st_heads == 1 ? 0 : head)) * m;
    const float* x = lp_p + row * g * m;
    const int64_t* tie = keyed ? ord_p + row * m : nullptr;
    for (int64_t i = 0; i < m; ++i) {
      float best = x[i];
      for (int64_t j = 1; j < g; ++j) best = std::max(best, x[j * m + i]);
      s[i] = ok[i] ? best : kNone;
      // One integer orders the picks: the score's bits made monotonic (high word), then the lower tie key
      // first (low word). Tie keys are reserve indices or positions, below 2^32.
      key[i] = (uint64_t(ordered_bits(s[i])) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(tie ? tie[i] : i));
    }
    std::iota(at.begin(), at.end(), 0);
    auto better = [&](int64_t a, int64_t c) { return key[a] > key[c]; };
    std::nth_element(at.begin(), at.begin() + kc, at.end(), better);
    std::sort(at.begin(), at.begin() + kc, better);
    for (int64_t j = 0; j < kc; ++j) {
      idx_p[row * kc + j] = at[j];
      score_p[row * kc + j] = s[at[j]];
    }
  }
  return {out_idx, out_score};
}

template <typename T>
void place_rows(const int64_t* idx, const float* score, const int64_t* rpos, const T* rk, const T* rv, T* k, T* v,
                int64_t* pos, int64_t* ridx, const int64_t* col, int64_t* churn, int64_t b, int64_t h, int64_t kc,
                int64_t d, int64_t rows, int64_t cols, int64_t budget) {
  std::unordered_set<int64_t> before;
  for (int64_t row = 0; row < b * h; ++row) {
    const int64_t slot = row / h;
    const int64_t* c = col + row * kc;
    const int64_t* r = idx + row * kc;
    const float* sc = score + row * kc;
    int64_t* rid = ridx + row * cols;
    before.clear();
    for (int64_t j = 0; j < kc; ++j)
      if (c[j] < budget && rid[c[j]] >= 0) before.insert(rid[c[j]]);
    int64_t fresh = 0;
    for (int64_t j = 0; j < kc; ++j) {
      const bool found = sc[j] > kNone;
      fresh += found && c[j] < budget && !before.count(r[j]);
      std::copy_n(rk + (row * rows + r[j]) * d, d, k + (row * cols + c[j]) * d);
      std::copy_n(rv + (row * rows + r[j]) * d, d, v + (row * cols + c[j]) * d);
      pos[row * cols + c[j]] = found && c[j] < budget ? rpos[slot * rows + r[j]] : -1;  // scratch stays empty
      rid[c[j]] = found ? r[j] : -1;
    }
    churn[row] = fresh;
  }
}

// Columns col [b, h, kc] of slots [0, b) take reserve rows idx [b, h, kc] of rk, rv [slots, h, rows, d] into
// k, v [slots, h, cols, d] with their positions (rpos [slots, rows]) and reserve indices into pos, ridx
// [slots, h, cols]; where score is -inf nothing was found (position and index -1). Returns the churn per
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

}  // namespace

TORCH_LIBRARY(slam_cpu, m) {
  m.def("group_top(Tensor logp, Tensor stored, int kc, Tensor order) -> (Tensor, Tensor)");
  m.def("place(Tensor idx, Tensor score, Tensor rpos, Tensor rk, Tensor rv, Tensor(a!) k, Tensor(b!) v, "
        "Tensor(c!) pos, Tensor(d!) ridx, Tensor col, int budget) -> Tensor");
}

TORCH_LIBRARY_IMPL(slam_cpu, CPU, m) {
  m.impl("group_top", &group_top);
  m.impl("place", &place);
}
