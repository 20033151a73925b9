// GroupNorm, optionally followed by SiLU, in one pass over memory. Included by sdrt_ops.cpp.
//
// x (N, C, ...) -> (x - mean) / sqrt(var + eps) * gamma + beta over each of `groups` groups of C/groups
// channels (PyTorch's group_norm), then y * sigmoid(y) for the SiLU form. gamma and beta hold C values.
//
// Why: torch exports group_norm as Reshape, InstanceNormalization, Reshape, Mul, Add and SiLU as Sigmoid, Mul;
// in a small U-Net those six operators per norm cost more in ONNX Runtime's per-operator overhead than their
// arithmetic (benchmarks/NOTES.md, section 10).
#pragma once
#include <cmath>
#include <cstdint>

#include "attention.h"  // v16, exp_nonpositive

namespace sdrt {

typedef float v16u __attribute__((vector_size(64), aligned(4)));  // an unaligned load or store of 16 floats

// y * sigmoid(y), with e^-|y| so the exponential never overflows
static inline v16 silu(v16 y) {
  const v16 e = exp_nonpositive(y < 0.f ? y : -y);
  return y * (y >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
}

static inline float silu(float y) {
  const float e = std::exp(-std::fabs(y));
  return y * (y >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
}

// Mean and variance of n floats, two passes (the numbers InstanceNormalization gives, without E[x^2] - E[x]^2's
// cancellation).
static inline void moments(const float* x, int64_t n, float& mean, float& var) {
  v16 acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += *reinterpret_cast<const v16u*>(x + i);
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  for (; i < n; ++i) sum += x[i];
  mean = static_cast<float>(sum / n);
  acc = v16{};
  i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const v16 d = *reinterpret_cast<const v16u*>(x + i) - mean;
    acc += d * d;
  }
  double sq = 0.0;
  for (int l = 0; l < kLanes; ++l) sq += acc[l];
  for (; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  var = static_cast<float>(sq / n);
}

static void group_norm(const float* x, const float* gamma, const float* beta, float* out, int64_t N, int64_t C,
                       int64_t spatial, int64_t groups, float eps, bool with_silu) {
  const int64_t per_group = C / groups;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = (n * C + g * per_group) * spatial;
      float mean, var;
      moments(x + first, per_group * spatial, mean, var);
      const float inv_std = 1.f / std::sqrt(var + eps);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const float a = gamma[c] * inv_std, b = beta[c] - mean * a;
        const float* xc = x + (n * C + c) * spatial;
        float* oc = out + (n * C + c) * spatial;
        int64_t i = 0;
        for (; i + kLanes <= spatial; i += kLanes) {
          const v16 y = *reinterpret_cast<const v16u*>(xc + i) * a + b;
          *reinterpret_cast<v16u*>(oc + i) = with_silu ? silu(y) : y;
        }
        for (; i < spatial; ++i) {
          const float y = xc[i] * a + b;
          oc[i] = with_silu ? silu(y) : y;
        }
      }
    }
}

}  // namespace sdrt
