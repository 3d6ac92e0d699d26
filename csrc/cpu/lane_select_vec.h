// bn_act.h's lane-wise selects on whole at::vec vectors, for every CPU kernel file.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "bn_act.h"

namespace resnet_fast {

// NaN rules as in bn_act.h: compares are false on NaN, so NaN passes through.
template <typename acc_t>
struct LaneSelect<at::vec::Vectorized<acc_t>> {
  using Vec = at::vec::Vectorized<acc_t>;
  static Vec relu_keep_nan(const Vec& v) { return Vec::blendv(v, Vec(acc_t(0)), v < Vec(acc_t(0))); }
  static Vec grad_where_positive(const Vec& grad, const Vec& out) {
    return Vec::blendv(grad, Vec(acc_t(0)), out <= Vec(acc_t(0)));
  }
};

}  // namespace resnet_fast
