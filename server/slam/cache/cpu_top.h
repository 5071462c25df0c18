// The best kc of one row of reserve tokens on CPUs (cpu_top.cpp), used by the selection ops (cpu_kernels.cpp,
// cpu_two_stage.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace slam_top {

// A thread's buffers for top_row, grown once and reused across its rows.
struct Scratch {
  std::vector<float> s;
  std::vector<int16_t> bins;
  std::vector<int32_t> hist;
  std::vector<uint64_t> pick;
};

// x [g, m] log-probabilities of the group's queries, ok [m] stored, tie [m] tie keys below 2^32 (nullptr:
// positions) -> the kc best tokens' tie keys (positions when tie is nullptr) at idx [kc] and their scores at
// score [kc], best first. A token's score is its maximum over the group, -inf where not stored; equal scores
// rank by lower tie key, as selection.top_by_index does. The vector path (cpu_scores.h's level) changes no result.
void top_row(const float* x, int64_t g, int64_t m, const bool* ok, const int64_t* tie, int64_t kc, int64_t* idx,
             float* score, Scratch& w);

}  // namespace slam_top
