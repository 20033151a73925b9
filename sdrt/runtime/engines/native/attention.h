// softmax(q k^T * scale) v per head, for small head sizes. Included by sdrt_ops.cpp; no ONNX Runtime here.
//
// Layout: q (B, S, H*D), k and v (B, L, H*D), out (B, S, H*D): the separate-input form of ONNX Runtime's
// com.microsoft MultiHeadAttention, which the graph falls back to when this library is not loaded.
//
// Why a kernel of our own: at head sizes 10 and 20 (the embedded model) a (S, D) x (D, L) product is too thin
// for a GEMM library, and ONNX Runtime's operator spends most of its time around the products (about 3x this
// kernel's time; benchmarks/NOTES.md, section 10). Here 16 queries share the SIMD lanes: the scores of one key
// for 16 queries are D fused multiply-adds, and the softmax over keys and the product with v are vertical too,
// so nothing is summed across lanes. One pass over the keys computes the scores and their running maximum, a
// second the exponentials and the weighted sum of v (the scores of 16 queries against L keys stay in L1).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace sdrt {

typedef float v16 __attribute__((vector_size(64)));  // GCC/Clang vectors: lowered to AVX-512, AVX2 or SSE
typedef int32_t i16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

// e^x for x <= 0 (softmax's arguments after the maximum is subtracted): 2^n * e^r with |r| <= ln2/2 and a
// degree-6 polynomial for e^r (the Cephes expf coefficients); relative error about 1e-7, as expf.
static inline v16 exp_nonpositive(v16 x) {
  x = x < -87.f ? v16{} - 87.f : x;  // 2^n must stay a normal float
  const v16 t = x * 1.44269504088896341f + 12582912.f;  // adding 1.5 * 2^23 rounds to the nearest integer
  const v16 n = t - 12582912.f;
  const v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2, ln2 split in two for precision
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16 er = p * r * r + r + 1.f;
  const i16 two_n = (__builtin_convertvector(n, i16) + 127) << 23;  // the float 2^n, built from its exponent
  return er * (v16)two_n;
}

// One (batch, head) pair. DC: the head size when known at compile time (registers), 0 for any size.
template <int DC>
static void attention_head(const float* q, const float* k, const float* v, float* out, int64_t S, int64_t L,
                           int64_t HD, int64_t Drt, float scale, std::vector<v16>& scores) {
  const int64_t D = DC > 0 ? DC : Drt;
  v16 fixed_qt[DC > 0 ? DC : 1], fixed_acc[DC > 0 ? DC : 1];
  std::vector<v16> any_qt(DC > 0 ? 0 : D), any_acc(DC > 0 ? 0 : D);
  v16* qt = DC > 0 ? fixed_qt : any_qt.data();    // (D, 16): this block's queries, transposed and scaled
  v16* acc = DC > 0 ? fixed_acc : any_acc.data();  // (D, 16): the weighted sum of v
  scores.resize(L);                                // (L, 16)
  for (int64_t i0 = 0; i0 < S; i0 += kLanes) {
    const int64_t n = std::min(kLanes, S - i0);  // the last block may be partial: its spare lanes hold zeros
    for (int64_t d = 0; d < D; ++d)
      for (int64_t l = 0; l < kLanes; ++l) qt[d][l] = l < n ? q[(i0 + l) * HD + d] * scale : 0.f;
    v16 top = v16{} - 3.4e38f;
    for (int64_t j = 0; j < L; ++j) {
      const float* kj = k + j * HD;
      v16 s = qt[0] * kj[0];
      for (int64_t d = 1; d < D; ++d) s += qt[d] * kj[d];
      scores[j] = s;
      top = s > top ? s : top;
    }
    v16 total = {};
    for (int64_t d = 0; d < D; ++d) acc[d] = v16{};
    for (int64_t j = 0; j < L; ++j) {
      const v16 p = exp_nonpositive(scores[j] - top);
      total += p;
      const float* vj = v + j * HD;
      for (int64_t d = 0; d < D; ++d) acc[d] += p * vj[d];
    }
    const v16 inv = 1.f / total;
    for (int64_t l = 0; l < n; ++l)
      for (int64_t d = 0; d < D; ++d) out[(i0 + l) * HD + d] = acc[d][l] * inv[l];
  }
}

// Every (batch, head) pair; compile-time head sizes for the sizes small models use.
static void attention(const float* q, const float* k, const float* v, float* out, int64_t B, int64_t S, int64_t L,
                      int64_t H, int64_t D, float scale) {
  const int64_t HD = H * D;
  std::vector<v16> scores;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const float* qb = q + b * S * HD + h * D;
      const float* kb = k + b * L * HD + h * D;
      const float* vb = v + b * L * HD + h * D;
      float* ob = out + b * S * HD + h * D;
      switch (D) {
        case 8: attention_head<8>(qb, kb, vb, ob, S, L, HD, D, scale, scores); break;
        case 10: attention_head<10>(qb, kb, vb, ob, S, L, HD, D, scale, scores); break;
        case 16: attention_head<16>(qb, kb, vb, ob, S, L, HD, D, scale, scores); break;
        case 20: attention_head<20>(qb, kb, vb, ob, S, L, HD, D, scale, scores); break;
        case 32: attention_head<32>(qb, kb, vb, ob, S, L, HD, D, scale, scores); break;
        default: attention_head<0>(qb, kb, vb, ob, S, L, HD, D, scale, scores);
      }
    }
}

}  // namespace sdrt
