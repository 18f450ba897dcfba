// The fused CPU Tucker-2 kernel proper (see tucker_conv2d_kernel.cpp for the algorithm): register-
// blocked GEMM micro-kernels over a tile of output rows, with no ATen dependency so that it can be
// compiled and checked on its own. Included by tucker_conv2d_kernel.cpp only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf: the L2 size that sizes the tiles
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#include "kdfast/tucker_geometry.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#endif
// Multiply-adds of the micro-kernels become FMAs (-std=c++17 otherwise forbids the contraction).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define KDFAST_TUCKER_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KDFAST_TUCKER_CLONES
#endif
#if defined(__GNUC__)
#define KDFAST_TUCKER_INLINE inline __attribute__((always_inline))
#else
#define KDFAST_TUCKER_INLINE inline
#endif

namespace kdfast {
namespace tucker {
namespace tiles {

// 32-byte vectors (8 floats / 4 doubles); the "u" types are unaligned and may alias their elements.
typedef float f32v __attribute__((vector_size(32)));
typedef float f32u __attribute__((vector_size(32), aligned(4), may_alias));
typedef double f64v __attribute__((vector_size(32)));
typedef double f64u __attribute__((vector_size(32), aligned(8), may_alias));
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using V = f32v;
  using U = f32u;
  static constexpr int kLanes = 8;
};
template <>
struct Vec<double> {
  using V = f64v;
  using U = f64u;
  static constexpr int kLanes = 4;
};

// A vector with every lane = s (V{} + s would add 0.0f first: it is not an identity for -0.0).
KDFAST_TUCKER_INLINE f32v splat(float s) { return f32v{s, s, s, s, s, s, s, s}; }
KDFAST_TUCKER_INLINE f64v splat(double s) { return f64v{s, s, s, s}; }

constexpr int kMR = 4;  // accumulator rows (output channels) of the micro-kernel
constexpr int kNV = 3;  // accumulator vectors (pixels) per row: 12 accumulators + 3 loads + 1 broadcast

// Per output channel: y = relu?(acc * mul[o] + add[o] + residual[o, p]); mul == nullptr means 1.
template <typename T>
struct Store {
  T* c;  // row m at c + m * ldc
  int64_t ldc;
  const T* mul;
  const T* add;
  const T* res;  // row m at res + m * ldc_res, or nullptr
  int64_t ld_res;
  bool relu;
};

// C[m0 + 0..MR, n0 + 0..NV*L) = A[m0 + .., :K] x B[:K][n0 + ..]: B is given as K row pointers (the
// shifted plane views of step 2). Rows of B are readable up to n0 + NV * L. `count` < NV * L stores
// only that many columns (the tail of a row of y).
template <typename T, int MR, int NV, bool kEpilogue>
KDFAST_TUCKER_INLINE void micro_kernel(int64_t k_total, const T* a, int64_t lda, const T* const* b, int64_t n0,
                                       const Store<T>& st, int64_t m0, int64_t count) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int L = Vec<T>::kLanes;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  const T* arow = a + m0 * lda;
  for (int64_t k = 0; k < k_total; ++k) {
    const T* bk = b[k] + n0;
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const U*>(bk + v * L);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const V am = splat(arow[m * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] += am * bv[v];
    }
  }
  // Fields copied to locals: the stores below may alias the Store struct, which would otherwise be
  // re-read after every store.
  T* const c = st.c;
  const int64_t ldc = st.ldc;
  if (!kEpilogue) {
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      T* crow = c + (m0 + m) * ldc + n0;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if (count >= (v + 1) * L) {
          *reinterpret_cast<U*>(crow + v * L) = acc[m][v];
        } else {
          for (int l = 0; l < L && v * L + l < count; ++l) crow[v * L + l] = acc[m][v][l];
        }
      }
    }
    return;
  }
  const T* const mul_p = st.mul;
  const T* const add_p = st.add;
  const T* const res = st.res;
  const int64_t ld_res = st.ld_res;
  const bool relu = st.relu;
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const int64_t row = m0 + m;
    const T mul = mul_p ? mul_p[row] : T(1);
    const T add = add_p ? add_p[row] : T(0);
    T* crow = c + row * ldc + n0;
    const T* rrow = res ? res + row * ld_res + n0 : nullptr;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      V r = acc[m][v] * mul + add;
      if (count >= (v + 1) * L) {
        if (rrow) r += *reinterpret_cast<const U*>(rrow + v * L);
        if (relu) r = r < V{} ? V{} : r;  // NaN stays NaN, as torch.relu
        *reinterpret_cast<U*>(crow + v * L) = r;
      } else {
        for (int l = 0; l < L && v * L + l < count; ++l) {
          T s = r[l];
          if (rrow) s += rrow[v * L + l];
          if (relu) s = s < T(0) ? T(0) : s;
          crow[v * L + l] = s;
        }
      }
    }
  }
}

// C (M, N) = A (M, K) x B (K row pointers, each readable up to N rounded up to the vector width).
template <typename T, bool E>
KDFAST_TUCKER_INLINE void gemm_impl(int64_t m_total, int64_t k_total, int64_t n_total, const T* a, int64_t lda,
                                    const T* const* b, const Store<T>& st) {
  constexpr int L = Vec<T>::kLanes;
  constexpr int64_t kBlock = kNV * L;
  for (int64_t n0 = 0; n0 < n_total; n0 += kBlock) {
    const int64_t count = std::min<int64_t>(kBlock, n_total - n0);
    int64_t m0 = 0;
    if (count > 2 * L) {
      for (; m0 + kMR <= m_total; m0 += kMR) micro_kernel<T, kMR, kNV, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 < m_total; ++m0) micro_kernel<T, 1, kNV, E>(k_total, a, lda, b, n0, st, m0, count);
    } else if (count > L) {
      for (; m0 + 6 <= m_total; m0 += 6) micro_kernel<T, 6, 2, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 < m_total; ++m0) micro_kernel<T, 1, 2, E>(k_total, a, lda, b, n0, st, m0, count);
    } else {
      for (; m0 + 8 <= m_total; m0 += 8) micro_kernel<T, 8, 1, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 < m_total; ++m0) micro_kernel<T, 1, 1, E>(k_total, a, lda, b, n0, st, m0, count);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KDFAST_TUCKER_AVX2 1
// float32 on AVX2+FMA CPUs: the same micro-kernel in intrinsics (GCC's code from the generic vectors
// above spilled accumulators and built broadcasts lane by lane, measured 2x slower).
#define KDFAST_AVX2_FN __attribute__((target("avx2,fma"), always_inline)) inline
template <int MR, int NV, bool kEpilogue>
KDFAST_AVX2_FN void micro_kernel_avx2(int64_t k_total, const float* a, int64_t lda, const float* const* b, int64_t n0,
                                      const Store<float>& st, int64_t m0, int64_t count) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  const float* arow = a + m0 * lda;
  for (int64_t k = 0; k < k_total; ++k) {
    const float* bk = b[k] + n0;
    __m256 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(bk + 8 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 am = _mm256_broadcast_ss(arow + m * lda + k);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(am, bv[v], acc[m][v]);
    }
  }
  float* const c = st.c;
  const int64_t ldc = st.ldc;
  const float* const mul_p = st.mul;
  const float* const add_p = st.add;
  const float* const res = st.res;
  const int64_t ld_res = st.ld_res;
  const bool relu = st.relu;
  const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const int64_t row = m0 + m;
    float* crow = c + row * ldc + n0;
    const float* rrow = (kEpilogue && res) ? res + row * ld_res + n0 : nullptr;
    const __m256 mul = _mm256_set1_ps(kEpilogue && mul_p ? mul_p[row] : 1.0f);
    const __m256 add = _mm256_set1_ps(kEpilogue && add_p ? add_p[row] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      __m256 r = acc[m][v];
      if (kEpilogue) r = _mm256_fmadd_ps(r, mul, add);
      if (count >= (v + 1) * 8) {
        if (kEpilogue) {
          if (rrow) r = _mm256_add_ps(r, _mm256_loadu_ps(rrow + 8 * v));
          // max(0, r) returns its second operand when r is NaN: NaN stays NaN, as with torch.relu
          if (relu) r = _mm256_max_ps(zero, r);
        }
        _mm256_storeu_ps(crow + 8 * v, r);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, r);
        for (int l = 0; l < 8 && v * 8 + l < count; ++l) {
          float s = tmp[l];
          if (kEpilogue) {
            if (rrow) s += rrow[8 * v + l];
            if (relu) s = s < 0.0f ? 0.0f : s;
          }
          crow[8 * v + l] = s;
        }
      }
    }
  }
}

template <bool E>
__attribute__((target("avx2,fma"))) void gemm_avx2(int64_t m_total, int64_t k_total, int64_t n_total, const float* a,
                                                   int64_t lda, const float* const* b, const Store<float>& st) {
  constexpr int64_t kBlock = kNV * 8;
  for (int64_t n0 = 0; n0 < n_total; n0 += kBlock) {
    const int64_t count = n_total - n0 < kBlock ? n_total - n0 : kBlock;
    int64_t m0 = 0;
    if (count > 16) {
      for (; m0 + kMR <= m_total; m0 += kMR) micro_kernel_avx2<kMR, kNV, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 < m_total; ++m0) micro_kernel_avx2<1, kNV, E>(k_total, a, lda, b, n0, st, m0, count);
    } else if (count > 8) {
      for (; m0 + 6 <= m_total; m0 += 6) micro_kernel_avx2<6, 2, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 < m_total; ++m0) micro_kernel_avx2<1, 2, E>(k_total, a, lda, b, n0, st, m0, count);
    } else {
      for (; m0 + 8 <= m_total; m0 += 8) micro_kernel_avx2<8, 1, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 < m_total; ++m0) micro_kernel_avx2<1, 1, E>(k_total, a, lda, b, n0, st, m0, count);
    }
  }
}

// float32 on AVX-512 CPUs: 16-lane vectors and 48-column blocks (3 zmm), up to 8 rows of
// accumulators (24 of the 32 zmm registers). oneDNN runs its convolutions with AVX-512 on these CPUs,
// so an AVX2-only fused kernel had half their FMA rate and lost wherever a layer is compute-bound
// (wide layers: docs/tucker-path.md). Partial blocks use masked stores (and masked residual loads).
#define KDFAST_AVX512_FN __attribute__((target("avx512f"), always_inline)) inline
template <int MR, int NV, bool kEpilogue>
KDFAST_AVX512_FN void micro_kernel_avx512(int64_t k_total, const float* a, int64_t lda, const float* const* b,
                                          int64_t n0, const Store<float>& st, int64_t m0, int64_t count) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  const float* arow = a + m0 * lda;
  for (int64_t k = 0; k < k_total; ++k) {
    const float* bk = b[k] + n0;
    __m512 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(bk + 16 * v);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 am = _mm512_set1_ps(arow[m * lda + k]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(am, bv[v], acc[m][v]);
    }
  }
  float* const c = st.c;
  const int64_t ldc = st.ldc;
  const float* const mul_p = st.mul;
  const float* const add_p = st.add;
  const float* const res = st.res;
  const int64_t ld_res = st.ld_res;
  const bool relu = st.relu;
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const int64_t row = m0 + m;
    float* crow = c + row * ldc + n0;
    const float* rrow = (kEpilogue && res) ? res + row * ld_res + n0 : nullptr;
    const __m512 mul = _mm512_set1_ps(kEpilogue && mul_p ? mul_p[row] : 1.0f);
    const __m512 add = _mm512_set1_ps(kEpilogue && add_p ? add_p[row] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const int64_t left = count - 16 * v;
      if (left <= 0) break;
      const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
      __m512 r = acc[m][v];
      if (kEpilogue) {
        r = _mm512_fmadd_ps(r, mul, add);
        if (rrow) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, rrow + 16 * v));
        // max(0, r) returns its second operand when r is NaN: NaN stays NaN, as with torch.relu
        if (relu) r = _mm512_maskz_max_ps(__mmask16(0xFFFF), zero, r);  // maskz: GCC 12 warns on max_ps
      }
      _mm512_mask_storeu_ps(crow + 16 * v, mask, r);
    }
  }
}

template <bool E>
__attribute__((target("avx512f"))) void gemm_avx512(int64_t m_total, int64_t k_total, int64_t n_total,
                                                     const float* a, int64_t lda, const float* const* b,
                                                     const Store<float>& st) {
  constexpr int64_t kBlock = 48;  // = read_block(4)
  for (int64_t n0 = 0; n0 < n_total; n0 += kBlock) {
    const int64_t count = n_total - n0 < kBlock ? n_total - n0 : kBlock;
    int64_t m0 = 0;
    if (count > 32) {
      for (; m0 + 8 <= m_total; m0 += 8) micro_kernel_avx512<8, 3, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 + 4 <= m_total; m0 += 4) micro_kernel_avx512<4, 3, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 < m_total; ++m0) micro_kernel_avx512<1, 3, E>(k_total, a, lda, b, n0, st, m0, count);
    } else if (count > 16) {
      for (; m0 + 8 <= m_total; m0 += 8) micro_kernel_avx512<8, 2, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 < m_total; ++m0) micro_kernel_avx512<1, 2, E>(k_total, a, lda, b, n0, st, m0, count);
    } else {
      for (; m0 + 8 <= m_total; m0 += 8) micro_kernel_avx512<8, 1, E>(k_total, a, lda, b, n0, st, m0, count);
      for (; m0 < m_total; ++m0) micro_kernel_avx512<1, 1, E>(k_total, a, lda, b, n0, st, m0, count);
    }
  }
}

// KDFAST_TUCKER_ISA=avx2 keeps the AVX2 kernel on an AVX-512 CPU (to compare the two).
inline bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f") && [] {
    const char* isa = std::getenv("KDFAST_TUCKER_ISA");
    return isa == nullptr || std::strcmp(isa, "avx2") != 0;
  }();
  return has;
}

inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// The GEMM entry points, one per dtype, each compiled for AVX2+FMA and the baseline (target_clones;
// the tile logic around them is memory copies that need no special ISA).
KDFAST_TUCKER_CLONES void gemm_f32(int64_t m, int64_t k, int64_t n, const float* a, int64_t lda,
                                   const float* const* b, const Store<float>& st) {
  const bool epilogue = st.mul || st.add || st.res || st.relu;
#ifdef KDFAST_TUCKER_AVX2
  if (cpu_has_avx512f()) {
    if (epilogue) {
      gemm_avx512<true>(m, k, n, a, lda, b, st);
    } else {
      gemm_avx512<false>(m, k, n, a, lda, b, st);
    }
    return;
  }
  if (cpu_has_avx2_fma()) {
    if (epilogue) {
      gemm_avx2<true>(m, k, n, a, lda, b, st);
    } else {
      gemm_avx2<false>(m, k, n, a, lda, b, st);
    }
    return;
  }
#endif
  if (epilogue) {
    gemm_impl<float, true>(m, k, n, a, lda, b, st);
  } else {
    gemm_impl<float, false>(m, k, n, a, lda, b, st);
  }
}
KDFAST_TUCKER_CLONES void gemm_f64(int64_t m, int64_t k, int64_t n, const double* a, int64_t lda,
                                   const double* const* b, const Store<double>& st) {
  if (st.mul || st.add || st.res || st.relu) {
    gemm_impl<double, true>(m, k, n, a, lda, b, st);
  } else {
    gemm_impl<double, false>(m, k, n, a, lda, b, st);
  }
}
inline void gemm(int64_t m, int64_t k, int64_t n, const float* a, int64_t lda, const float* const* b,
                 const Store<float>& st) {
  gemm_f32(m, k, n, a, lda, b, st);
}
inline void gemm(int64_t m, int64_t k, int64_t n, const double* a, int64_t lda, const double* const* b,
                 const Store<double>& st) {
  gemm_f64(m, k, n, a, lda, b, st);
}

// Columns a GEMM may read past the last one it computes, rounded up: every B row it reads must be
// readable up to its column count rounded up to this (float32: the AVX-512 kernel's 48-column block).
constexpr int64_t read_block(size_t elem_size) { return elem_size == 4 ? 2 * kNV * 8 : kNV * 4; }

struct Geometry {
  int64_t n, c, h, w, r_in, r_out, o, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw;
  int64_t wq;  // width of a phase plane: ceil((W + 2 pw) / sw)
};

// Buffer sizes (elements) of one tile of `rows` output rows; every buffer has slack for the
// micro-kernel's whole-vector reads past the last column.
struct TileSizes {
  int64_t band_rows, plane_rows, plane, planes, xt, t1, z2, z2c;
};

inline TileSizes tile_sizes(const Geometry& g, int64_t rows, int64_t slack) {
  TileSizes s;
  s.band_rows = halo_extent<int64_t>(rows, g.kh, g.sh, g.dh);  // padded input rows read
  s.plane_rows = ceil_div<int64_t>(s.band_rows, g.sh);
  // Reads of the core GEMM go up to row (rows - 1 + (kh - 1) dh / sh) of a plane plus one vector block.
  s.plane = (s.plane_rows + 1) * g.wq + slack + g.kw * g.dw;
  s.planes = g.r_in * g.sh * g.sw * s.plane;
  s.xt = g.c * s.band_rows * g.w;  // channels_last input gathered to channel-major
  s.t1 = g.r_in * s.band_rows * g.w + slack;
  s.z2 = g.r_out * (rows * g.wq + slack);
  s.z2c = g.wq == g.ow ? 0 : g.r_out * (rows * g.ow + slack);
  return s;
}

// Bytes of tile buffers per thread: half of this core's L2 (sysconf), between 256 KiB and 1 MiB. The
// 256 KiB of the AMD EPYC VM the kernel was first tuned on (512 KiB L2) held wide layers to bands of a
// few rows on CPUs with larger L2s: on a 2-vCPU Xeon with 2 MiB L2, 1 MiB made ResNet-50's stride-2
// Tucker layers 1.2-2.3x faster (batch 1 and 8) and 2 MiB or more was slower again.
inline int64_t tile_budget_bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = static_cast<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
    if (l2 <= 0) l2 = 512 * 1024;
    return std::min<int64_t>(1024 * 1024, std::max<int64_t>(256 * 1024, l2 / 2));
  }();
  return bytes;
}

// Output rows per tile: the largest band whose buffers fit in tile_budget_bytes(), cut further until
// there are at least two tiles per thread so that both cores get work at batch 1.
inline int64_t rows_per_tile(const Geometry& g, size_t elem_size, int64_t threads) {
  const int64_t slack = read_block(elem_size);
  const int64_t budget = tile_budget_bytes() / static_cast<int64_t>(elem_size);
  int64_t rows = g.oh;
  while (rows > 1) {
    const TileSizes s = tile_sizes(g, rows, slack);
    if (s.planes + s.t1 + s.z2 + s.z2c <= budget) break;
    rows = ceil_div<int64_t>(rows, 2);
  }
  while (rows > 1 && g.n * ceil_div(g.oh, rows) < 2 * threads) rows = ceil_div<int64_t>(rows, 2);
  return rows;
}

template <typename T>
struct FusedArgs {
  const T* x;  // (N, C, H, W) in the strides below
  int64_t xs_n, xs_c, xs_h, xs_w;
  bool x_nchw;  // W and H dense: a band of rows of one channel is one contiguous run
  const T* first;  // (R_in, C) contiguous
  const T* core;   // (R_out, R_in * kh * kw) contiguous
  const T* last;   // (O, R_out) contiguous
  const T* mul;    // (O,) or nullptr
  const T* add;    // (O,) or nullptr (bias and shift folded)
  const T* res;    // (N, O, H_out, W_out) contiguous or nullptr
  bool relu;
  T* y;  // (N, O, H_out, W_out) contiguous
};

// One tile: sample n, output rows [oh0, oh0 + rows). buf holds the TileSizes buffers in order.
template <typename T>
void fused_tile(const FusedArgs<T>& p, const Geometry& g, const TileSizes& cap, int64_t n,
                                     int64_t oh0, int64_t rows, T* planes, T* xt, T* t1, T* z2, T* z2c,
                                     std::vector<const T*>& ptrs) {
  const int64_t band_rows = halo_extent<int64_t>(rows, g.kh, g.sh, g.dh);
  const int64_t prow0 = oh0 * g.sh;  // first padded row of the band (input row prow0 - ph)
  const int64_t ih0 = std::max<int64_t>(0, prow0 - g.ph), ih1 = std::min<int64_t>(g.h, prow0 - g.ph + band_rows);
  const int64_t plane_stride = cap.plane;
  auto plane_of = [&](int64_t ri, int64_t a, int64_t b) { return planes + ((ri * g.sh + a) * g.sw + b) * plane_stride; };

  // Padded rows of the band outside the image are zero (columns of padding were zeroed once).
  for (int64_t pr = 0; pr < band_rows; ++pr) {
    const int64_t ih = prow0 + pr - g.ph;
    if (ih >= ih0 && ih < ih1) continue;
    for (int64_t ri = 0; ri < g.r_in; ++ri)
      for (int64_t b = 0; b < g.sw; ++b) {
        T* row = plane_of(ri, pr % g.sh, b) + (pr / g.sh) * g.wq;
        std::fill(row, row + g.wq, T(0));
      }
  }

  // 1. z1 = first x[n, :, ih0:ih1, :] into t1 (R_in, pixels), then into the planes.
  if (ih1 > ih0) {
    const int64_t pixels = (ih1 - ih0) * g.w;
    const T* xn = p.x + n * p.xs_n + ih0 * p.xs_h;
    if (p.x_nchw) {
      for (int64_t c = 0; c < g.c; ++c) ptrs[c] = xn + c * p.xs_c;
    } else {  // e.g. channels_last: gather the band channel-major (it stays in cache)
      for (int64_t ih = 0; ih < ih1 - ih0; ++ih)
        for (int64_t iw = 0; iw < g.w; ++iw) {
          const T* src = xn + ih * p.xs_h + iw * p.xs_w;
          T* dst = xt + ih * g.w + iw;
          for (int64_t c = 0; c < g.c; ++c) dst[c * band_rows * g.w] = src[c * p.xs_c];
        }
      for (int64_t c = 0; c < g.c; ++c) ptrs[c] = xt + c * band_rows * g.w;
    }
    // The GEMM reads whole vectors: the last block of x may end inside a vector, so that block is
    // computed from a copy with slack (t1's tail doubles as that copy's destination row below).
    constexpr int64_t kBlock = read_block(sizeof(T));
    const int64_t safe = (pixels / kBlock) * kBlock;
    const Store<T> st{t1, pixels, nullptr, nullptr, nullptr, 0, false};
    if (safe > 0) gemm(g.r_in, g.c, safe, p.first, g.c, ptrs.data(), st);
    if (safe < pixels) {
      const int64_t rest = pixels - safe;
      // Tail: a small channel-major copy of the remaining columns, with slack.
      std::vector<T> tail(static_cast<size_t>(g.c * kBlock), T(0));
      std::vector<const T*> tail_ptrs(static_cast<size_t>(g.c));
      for (int64_t c = 0; c < g.c; ++c) {
        std::copy(ptrs[c] + safe, ptrs[c] + pixels, tail.data() + c * kBlock);
        tail_ptrs[c] = tail.data() + c * kBlock;
      }
      const Store<T> st_tail{t1 + safe, pixels, nullptr, nullptr, nullptr, 0, false};
      gemm(g.r_in, g.c, rest, p.first, g.c, tail_ptrs.data(), st_tail);
    }
    // Scatter into the phase planes at padded coordinates (row prow, column iw + pw).
    for (int64_t ri = 0; ri < g.r_in; ++ri) {
      for (int64_t ih = ih0; ih < ih1; ++ih) {
        const int64_t pr = ih + g.ph - prow0;
        const T* src = t1 + ri * pixels + (ih - ih0) * g.w;
        if (g.sw == 1) {
          std::memcpy(plane_of(ri, pr % g.sh, 0) + (pr / g.sh) * g.wq + g.pw, src, sizeof(T) * g.w);
        } else {
          // Column phase b holds the padded columns b, b + sw, ...: one strided pass per phase, with
          // no division per element (this loop dominated stride-2 layers' time).
          for (int64_t b = 0; b < g.sw; ++b) {
            const int64_t iw0 = ((b - g.pw) % g.sw + g.sw) % g.sw;  // first iw with (iw + pw) % sw == b
            T* dst = plane_of(ri, pr % g.sh, b) + (pr / g.sh) * g.wq + (iw0 + g.pw) / g.sw;
            for (int64_t iw = iw0, q = 0; iw < g.w; iw += g.sw, ++q) dst[q] = src[iw];
          }
        }
      }
    }
  }

  // 2. z2 (R_out, rows * Wq) = core (R_out, R_in kh kw) x the shifted plane views.
  const int64_t nq = rows * g.wq;
  for (int64_t ri = 0; ri < g.r_in; ++ri)
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t ti = i * g.dh, tj = j * g.dw;
        ptrs[(ri * g.kh + i) * g.kw + j] = plane_of(ri, ti % g.sh, tj % g.sw) + (ti / g.sh) * g.wq + tj / g.sw;
      }
  const int64_t ldz2 = nq + read_block(sizeof(T));
  gemm(g.r_out, g.r_in * g.kh * g.kw, nq, p.core, g.r_in * g.kh * g.kw, ptrs.data(),
          Store<T>{z2, ldz2, nullptr, nullptr, nullptr, 0, false});

  // Drop the columns past W_out (plane width Wq >= W_out).
  const T* zsrc = z2;
  int64_t ldz = ldz2;
  if (g.wq != g.ow) {
    ldz = rows * g.ow + read_block(sizeof(T));
    for (int64_t r = 0; r < g.r_out; ++r)
      for (int64_t oh = 0; oh < rows; ++oh)
        std::memcpy(z2c + r * ldz + oh * g.ow, z2 + r * ldz2 + oh * g.wq, sizeof(T) * g.ow);
    zsrc = z2c;
  }

  // 3. y[n, :, oh0:oh0+rows, :] = epilogue(last x z2).
  for (int64_t r = 0; r < g.r_out; ++r) ptrs[r] = zsrc + r * ldz;
  const int64_t out_plane = g.oh * g.ow;
  const int64_t offset = n * g.o * out_plane + oh0 * g.ow;
  const Store<T> st{p.y + offset, out_plane, p.mul, p.add, p.res ? p.res + offset : nullptr, out_plane, p.relu};
  gemm(g.o, g.r_out, rows * g.ow, p.last, g.r_out, ptrs.data(), st);
}

template <typename T>
void fused_range(const FusedArgs<T>& p, const Geometry& g, int64_t rows, int64_t tiles,
                                      int64_t begin, int64_t end) {
  const TileSizes cap = tile_sizes(g, rows, read_block(sizeof(T)));
  // Zero once: the padding columns and the slack are never written.
  std::vector<T> buf(static_cast<size_t>(cap.planes + (p.x_nchw ? 0 : cap.xt) + cap.t1 + cap.z2 + cap.z2c), T(0));
  T* planes = buf.data();
  T* xt = planes + cap.planes;
  T* t1 = xt + (p.x_nchw ? 0 : cap.xt);
  T* z2 = t1 + cap.t1;
  T* z2c = z2 + cap.z2;
  std::vector<const T*> ptrs(static_cast<size_t>(std::max({g.c, g.r_in * g.kh * g.kw, g.r_out})));
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / tiles, oh0 = (item % tiles) * rows;
    fused_tile<T>(p, g, cap, n, oh0, std::min(rows, g.oh - oh0), planes, xt, t1, z2, z2c, ptrs);
  }
}

}  // namespace tiles
}  // namespace tucker
}  // namespace kdfast

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
