// Device code of the fused Tucker-2 convolution (tucker_conv2d_kernel.cu launches it; see there for the
// path rule). No ATen here: tests/emulator runs the kernel on the CPU.
//
// Each thread block owns a TILE_H x TILE_W tile of output pixels of one sample and all O output channels:
//   1. stage 1: projects the input tile plus its halo (kdfast/tucker_geometry.h) to R_in channels
//      into shared memory, streaming x through shared memory in chunks of kChannelChunk channels;
//      positions outside the image are the core's zero padding;
//   2. stage 2: applies the R_out x R_in x kh x kw core from shared memory to get the R_out x tile
//      intermediate, also in shared memory;
//   3. stage 3: projects to O channels (+ bias) and writes y. Only x is read and y written in global
//      memory: neither intermediate ever leaves the SM.
// float32, float16 and bfloat16 inputs, float32 accumulation and float32 intermediates (so half
// types are rounded once, at the output). Plain FMA loops: no tensor cores (TDC, PPoPP'23, shows a
// scalar-FMA core kernel of this shape; CUTLASS b2b fusion would be the tensor-core route).
#pragma once

#include <cstddef>
#include <cstdint>

#include "device.cuh"
#include "kdfast/tucker_geometry.h"

namespace kdfast {
namespace tucker {

constexpr int kThreads = 256;
constexpr int kChannelChunk = 16;  // input channels staged in shared memory per step of stage 1

struct FusedParams {
  int n, c, h, w, r_in, r_out, o, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
  int tile_h, tile_w, halo_h, halo_w;
};

// Shared memory of one block, in floats: z1 (R_in x halo), z2 (R_out x tile), x chunk, first chunk.
inline size_t smem_floats(const FusedParams& p) {
  const size_t halo = static_cast<size_t>(p.halo_h) * p.halo_w, tile = static_cast<size_t>(p.tile_h) * p.tile_w;
  return p.r_in * halo + p.r_out * tile + kChannelChunk * halo + static_cast<size_t>(p.r_in) * kChannelChunk;
}

// Tile sizes tried, largest first.
constexpr int kTiles[][2] = {{8, 8}, {4, 8}, {4, 4}, {2, 4}};

// Sets p's tile and halo to the largest tile whose shared memory fits `smem_limit` bytes (the device's
// opt-in maximum) and returns its byte count; 0 when even the smallest tile does not fit.
inline size_t plan_tile(FusedParams& p, size_t smem_limit) {
  for (const auto& t : kTiles) {
    p.tile_h = t[0], p.tile_w = t[1];
    p.halo_h = halo_extent(p.tile_h, p.kh, p.sh, p.dh);
    p.halo_w = halo_extent(p.tile_w, p.kw, p.sw, p.dw);
    const size_t bytes = smem_floats(p) * sizeof(float);
    if (bytes <= smem_limit) return bytes;
  }
  return 0;
}

// grid N * ceil(OH / tile_h) * ceil(OW / tile_w), block kThreads, dynamic shared smem_floats(p) floats.
// __launch_bounds__(kThreads, 2): with kThreads alone ptxas (CUDA 13) capped sm_80 at 40 registers
// and spilled 12 bytes in the float16 / bfloat16 instances; 2 blocks per SM lets it use 64
// (tests/build/ptxas_expected.json).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) tucker_conv2d_fused_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ first, const scalar_t* __restrict__ core,
    const scalar_t* __restrict__ last, const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
    const FusedParams p) {
  KDFAST_DYNAMIC_SHARED(float, smem);
  const int halo = p.halo_h * p.halo_w, tile = p.tile_h * p.tile_w;
  float* z1s = smem;                     // [R_in][halo]
  float* z2s = z1s + p.r_in * halo;      // [R_out][tile]
  float* xs = z2s + p.r_out * tile;      // [kChannelChunk][halo]
  float* fs = xs + kChannelChunk * halo;  // [R_in][kChannelChunk]

  const int tiles_w = ceil_div(p.ow, p.tile_w), tiles_h = ceil_div(p.oh, p.tile_h);
  int block = blockIdx.x;
  const int tile_col = block % tiles_w;
  block /= tiles_w;
  const int tile_row = block % tiles_h;
  const int n = block / tiles_h;
  const int oh0 = tile_row * p.tile_h, ow0 = tile_col * p.tile_w;
  const int ih0 = halo_begin(oh0, p.sh, p.ph), iw0 = halo_begin(ow0, p.sw, p.pw);
  const int tid = threadIdx.x;

  // Stage 1: z1[r][q] = sum_c first[r][c] x[n][c][halo position q] (0 outside the image).
  for (int i = tid; i < p.r_in * halo; i += kThreads) z1s[i] = 0.f;
  for (int c0 = 0; c0 < p.c; c0 += kChannelChunk) {
    const int cc = min(kChannelChunk, p.c - c0);
    __syncthreads();  // the previous chunk has been consumed
    for (int i = tid; i < cc * halo; i += kThreads) {
      const int c = i / halo, q = i % halo;
      const int ih = ih0 + q / p.halo_w, iw = iw0 + q % p.halo_w;
      xs[i] = (in_range(ih, p.h) && in_range(iw, p.w))
                  ? static_cast<float>(x[((static_cast<int64_t>(n) * p.c + c0 + c) * p.h + ih) * p.w + iw])
                  : 0.f;
    }
    for (int i = tid; i < p.r_in * cc; i += kThreads) {
      const int r = i / cc, c = i % cc;
      fs[r * kChannelChunk + c] = static_cast<float>(first[static_cast<int64_t>(r) * p.c + c0 + c]);
    }
    __syncthreads();
    for (int i = tid; i < p.r_in * halo; i += kThreads) {
      const int r = i / halo, q = i % halo;
      float acc = z1s[i];
      for (int c = 0; c < cc; ++c) acc = fmaf(fs[r * kChannelChunk + c], xs[c * halo + q], acc);
      z1s[i] = acc;
    }
  }
  __syncthreads();

  // Stage 2: z2[ro][t] = sum_{r, i, j} core[ro][r][i][j] z1[r][row(t, i)][col(t, j)].
  const int taps = p.kh * p.kw;
  for (int idx = tid; idx < p.r_out * tile; idx += kThreads) {
    const int ro = idx / tile, t = idx % tile;
    const int th = t / p.tile_w, tw = t % p.tile_w;
    const scalar_t* w = core + static_cast<int64_t>(ro) * p.r_in * taps;
    float acc = 0.f;
    for (int r = 0; r < p.r_in; ++r) {
      for (int i = 0; i < p.kh; ++i) {
        // Halo-local row/column of output (th, tw) through taps (i, 0): the tile-relative input_index.
        const float* z_row = z1s + r * halo + input_index(th, i, p.sh, 0, p.dh) * p.halo_w + tw * p.sw;
        const scalar_t* w_row = w + (r * p.kh + i) * p.kw;
        for (int j = 0; j < p.kw; ++j) acc = fmaf(static_cast<float>(w_row[j]), z_row[j * p.dw], acc);
      }
    }
    z2s[idx] = acc;
  }
  __syncthreads();

  // Stage 3: y[n][o][oh][ow] = bias[o] + sum_ro last[o][ro] z2[ro][t], for the tile's in-image pixels.
  for (int idx = tid; idx < p.o * tile; idx += kThreads) {
    const int o = idx / tile, t = idx % tile;
    const int oh = oh0 + t / p.tile_w, ow = ow0 + t % p.tile_w;
    if (oh >= p.oh || ow >= p.ow) continue;
    float acc = bias != nullptr ? static_cast<float>(bias[o]) : 0.f;
    const scalar_t* l = last + static_cast<int64_t>(o) * p.r_out;
    for (int ro = 0; ro < p.r_out; ++ro) acc = fmaf(static_cast<float>(l[ro]), z2s[ro * tile + t], acc);
    y[((static_cast<int64_t>(n) * p.o + o) * p.oh + oh) * p.ow + ow] = static_cast<scalar_t>(acc);
  }
}

}  // namespace tucker
}  // namespace kdfast
