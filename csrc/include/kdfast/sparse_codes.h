// Sparse codes of SRM (Tran, Gabbouj, Iosifidis, "Knowledge Distillation By Sparse Representation
// Matching", arXiv 2103.17012; official code viebboy/SRM, cifar100/code/Layers.py): per pixel
// s = sigmoid(C^T x + b) and its k largest entries. Scalar pieces shared by the CPU loops
// (csrc/ops/cpu/sparse_codes_kernel.cpp) and the CUDA kernel (csrc/ops/cuda/sparse_codes_kernel.cu).
//
// Selection works on the pre-activation z = C^T x (the scalar intercept b shifts every entry alike and
// sigmoid is increasing, so the order is that of s in exact arithmetic): the sigmoid is evaluated for
// the k winners only, and entries that saturate to the same float (s = 1 for z > ~17 in float32)
// are still ranked exactly. Ties in z go to the lower codeword index.
#pragma once

#include "kdfast/math.h"

namespace kdfast {
namespace sparse_codes {

template <typename acc_t>
KDFAST_HOST_DEVICE acc_t sigmoid(acc_t u) {
  return acc_t(1) / (acc_t(1) + math::exp_(-u));
}

// d sigmoid(u) / du = s (1 - s).
template <typename acc_t>
KDFAST_HOST_DEVICE acc_t sigmoid_grad(acc_t s) {
  return s * (acc_t(1) - s);
}

// Running top-k over a stream of (value, index) pairs visited in increasing index order: best_v /
// best_i hold the `filled` largest so far, sorted by value descending, ties by index ascending. An
// entry equal to the current k-th value does not enter (it has a larger index), so the result is the
// first k entries of a stable descending sort. (With NaN pre-activations the selection is
// unspecified; the NaN still reaches the values when it is selected.)
template <typename acc_t, typename index_t>
KDFAST_HOST_DEVICE void topk_push(acc_t v, index_t j, int k, int& filled, acc_t* best_v, index_t* best_i) {
  int pos;
  if (filled < k) {
    pos = filled++;
  } else if (v > best_v[k - 1]) {
    pos = k - 1;
  } else {
    return;
  }
  while (pos > 0 && v > best_v[pos - 1]) {
    best_v[pos] = best_v[pos - 1];
    best_i[pos] = best_i[pos - 1];
    --pos;
  }
  best_v[pos] = v;
  best_i[pos] = j;
}

}  // namespace sparse_codes
}  // namespace kdfast
