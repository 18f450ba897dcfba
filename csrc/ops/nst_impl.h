// Neuron Selectivity Transfer (Huang & Wang 2017, arXiv 1707.01219) MMD^2 drivers, written once
// against the backend primitives.
//
// Each channel's H*W vector is L2-normalised (x_hat = f / max(||f||, eps)). With the student's rows
// weighted w = 1/Cs and the teacher's w = -1/Ct, every kernel's MMD^2 is one weighted sum
//   MMD^2 = sum_{p,q} w_p w_q k(x_p, x_q)                              (p, q over all Cs + Ct rows)
// and its gradient with respect to x_hat_p is a row-scaled matrix product:
//   linear    k = x.y           G_p = 2 w_p m,                 m = sum_q w_q x_q       (B, HW)
//   poly      k = (x.y)^2       G_p = 4 w_p sum_q w_q K_pq x_q  (channel Grams K, C x C)
//                                 = 4 w_p (X M)_p,             M = sum_q w_q x_q x_q^T  (HW x HW)
//   gaussian  k = exp(-|x-y|^2 / (2 sigma^2))
//                               G_p = (2 w_p / sigma^2) (sum_q w_q k_pq x_q - (sum_q w_q k_pq) x_p)
//             The q = p terms of G_p cancel exactly, and k_pp = 1: both are set exactly
//             (math::gaussian_diagonal), not taken from the Gram identity |x|^2 + |y|^2 - 2 x.y,
//             whose rounding the 1 / sigma^2 factor magnifies (a 3.7e-3 relative float32
//             gradient error at sigma 0.25 before).
// The poly value is the same through either Gram (sum_ij (A B^T)_ij^2 = tr(A^T A B^T B)); the
// caller picks the cheaper form ("poly_channel" or "poly_spatial"). The gaussian kernel values are
// computed in row tiles over bounded sample chunks, in forward and again in backward, so B*C*C
// kernel values never exist at once.
#pragma once

#include <array>
#include <string>
#include <tuple>

#include "loss_common.h"
#include "primitives.h"

namespace kdfast {

enum class NstKernel { Linear, PolyChannel, PolySpatial, Gaussian };

inline NstKernel parse_nst_kernel(c10::string_view kernel) {
  if (kernel == "linear") return NstKernel::Linear;
  if (kernel == "poly_channel") return NstKernel::PolyChannel;
  if (kernel == "poly_spatial") return NstKernel::PolySpatial;
  if (kernel == "gaussian") return NstKernel::Gaussian;
  TORCH_CHECK_VALUE(false, "kernel must be one of 'linear', 'poly_channel', 'poly_spatial', 'gaussian' ",
                    "(kdfast.ops.nst_loss accepts 'poly' and picks the cheaper form), got '",
                    std::string(kernel), "'");
}

inline void check_nst_args(const at::Tensor& fs, const at::Tensor& ft, double sigma) {
  check_feature_map(fs, "fs");
  check_feature_map(ft, "ft");
  check_compatible(fs, "fs", ft, "ft");
  check_same_spatial(fs, "fs", ft, "ft");
  TORCH_CHECK_VALUE(sigma > 0 && std::isfinite(sigma), "sigma must be a positive finite number, got ", sigma);
}

// Normalised rows of both maps stacked as x_hat (B, Cs + Ct, HW) in the GEMM dtype, and their
// norms (B, Cs + Ct) in the accumulate dtype.
struct NormalizedRows {
  at::Tensor x_hat, norms;
  int64_t cs = 0, ct = 0;
  at::Tensor student() const { return x_hat.narrow(1, 0, cs); }
  at::Tensor teacher() const { return x_hat.narrow(1, cs, ct); }
};

// Row norms (B, Cs + Ct) of both maps in the accumulate dtype.
inline at::Tensor row_norms(const at::Tensor& fs, const at::Tensor& ft, at::ScalarType acc) {
  return at::cat({at::linalg_vector_norm(rows_of(fs), 2, {2}, false, acc),
                  at::linalg_vector_norm(rows_of(ft), 2, {2}, false, acc)},
                 1);
}

inline NormalizedRows normalize_rows(const at::Tensor& fs, const at::Tensor& ft, at::ScalarType gemm_dtype,
                                     at::ScalarType acc) {
  const int64_t batch = fs.size(0), cs = fs.size(1), ct = ft.size(1), hw = fs.size(2) * fs.size(3);
  NormalizedRows r{at::empty({batch, cs + ct, hw}, fs.options().dtype(gemm_dtype)), row_norms(fs, ft, acc), cs, ct};
  const auto rnorm = r.norms.clamp_min(kNormalizeEps).reciprocal_().unsqueeze(2);
  auto xs = r.student(), xt = r.teacher();
  at::mul_out(xs, rows_of(fs), rnorm.narrow(1, 0, cs));
  at::mul_out(xt, rows_of(ft), rnorm.narrow(1, cs, ct));
  return r;
}

// Workspace bound for one tile of gaussian kernel values (elements).
constexpr int64_t kGaussianTileElements = int64_t(1) << 22;
constexpr int64_t kGaussianTileRows = 64;

// Visits the gaussian kernel tile by tile: for each (sample chunk, row tile) of student rows
// [0, Cs) and/or teacher rows [Cs, Cs + Ct), `visit(part, n0, nb, r0, tr, weights, row_sums)` gets
// weights[n, p, q] = w_q k(x_p, x_q) (nb, tr, Cs + Ct) and their row sums (nb, tr); `part` is 0 for
// student rows and 1 for teacher rows, r0 counts from the part's first row. The diagonal q = p is
// w_p exactly with keep_diagonal (the loss), else 0 (the gradient).
template <class P, class Visit>
void for_each_gaussian_tile(const NormalizedRows& rows, double sigma, std::array<bool, 2> parts, bool keep_diagonal,
                            Visit&& visit) {
  const auto& x = rows.x_hat;
  const int64_t batch = x.size(0), channels = x.size(1), hw = x.size(2);
  const auto rnorm = rows.norms.clamp_min(kNormalizeEps).reciprocal();
  const auto sqnorm = (rows.norms * rnorm).square_();  // |x_hat|^2: 1, or less for clamped rows
  auto col_weights = at::empty({channels}, rows.norms.options());
  col_weights.narrow(0, 0, rows.cs).fill_(1.0 / rows.cs);
  col_weights.narrow(0, rows.cs, rows.ct).fill_(-1.0 / rows.ct);
  const double inv_two_sigma_sq = 1.0 / (2.0 * sigma * sigma);

  const int64_t tile_rows = std::min<int64_t>(kGaussianTileRows, channels);
  const int64_t chunk = std::max<int64_t>(1, kGaussianTileElements / (tile_rows * std::max(channels, hw)));
  auto weights_buf = at::empty({std::min(chunk, batch) * tile_rows * channels}, rows.norms.options());
  auto sums_buf = at::empty({std::min(chunk, batch) * tile_rows}, rows.norms.options());
  const std::array<int64_t, 2> part_begin{0, rows.cs}, part_size{rows.cs, rows.ct};
  for (int part = 0; part < 2; ++part) {
    if (!parts[part]) continue;
    for (int64_t n0 = 0; n0 < batch; n0 += chunk) {
      const int64_t nb = std::min(chunk, batch - n0);
      const auto x_chunk = x.narrow(0, n0, nb);
      const auto sq_cols = sqnorm.narrow(0, n0, nb).contiguous();
      for (int64_t r0 = 0; r0 < part_size[part]; r0 += tile_rows) {
        const int64_t tr = std::min(tile_rows, part_size[part] - r0);
        const int64_t row0 = part_begin[part] + r0;
        auto weights = weights_buf.narrow(0, 0, nb * tr * channels).view({nb, tr, channels});
        auto sums = sums_buf.narrow(0, 0, nb * tr).view({nb, tr});
        P::bmm_out(weights, x_chunk.narrow(1, row0, tr), x_chunk.transpose(1, 2));
        const auto sq_rows = sq_cols.narrow(1, row0, tr).contiguous();
        P::gaussian_rows_(weights, sq_rows, sq_cols, col_weights, inv_two_sigma_sq, row0, keep_diagonal, sums);
        visit(part, n0, nb, r0, tr, weights, sums);
      }
    }
  }
}

// poly_channel's aux, one flat buffer: the normalised Grams K_ss (B, Cs, Cs), K_st (B, Cs, Ct),
// K_tt (B, Ct, Ct), then the row norms (B, Cs + Ct). kdfast/_registrations.py sizes it the same way.
inline int64_t nst_poly_channel_aux_size(int64_t batch, int64_t cs, int64_t ct) {
  return batch * (cs * cs + cs * ct + ct * ct) + batch * (cs + ct);
}

struct PolyChannelAux {
  at::Tensor k_ss, k_st, k_tt, norms;
};

inline PolyChannelAux nst_poly_channel_aux(const at::Tensor& aux, int64_t batch, int64_t cs, int64_t ct) {
  const int64_t n_ss = batch * cs * cs, n_st = batch * cs * ct, n_tt = batch * ct * ct;
  return {aux.narrow(0, 0, n_ss).view({batch, cs, cs}), aux.narrow(0, n_ss, n_st).view({batch, cs, ct}),
          aux.narrow(0, n_ss + n_st, n_tt).view({batch, ct, ct}),
          aux.narrow(0, n_ss + n_st + n_tt, batch * (cs + ct)).view({batch, cs + ct})};
}

// Returns (loss, aux): aux is what the backward needs besides the inputs; m (B, HW) for linear,
// the packed channel Grams and row norms [K_ss | K_st | K_tt | norms] (flat, see
// nst_poly_channel_aux) for poly_channel, M (B, HW, HW) for poly_spatial and an empty tensor for
// gaussian.
template <class P>
std::tuple<at::Tensor, at::Tensor> nst_loss_impl(const at::Tensor& fs, const at::Tensor& ft, c10::string_view kernel,
                                                 c10::string_view reduction, double sigma) {
  check_nst_args(fs, ft, sigma);
  const auto kind = parse_nst_kernel(kernel);
  const auto red = parse_reduction(reduction);
  const auto acc = accumulate_type(fs.scalar_type());
  const auto gd = P::gemm_dtype(fs.scalar_type());
  const int64_t batch = fs.size(0), cs = fs.size(1), ct = ft.size(1), hw = fs.size(2) * fs.size(3);
  const double ws = 1.0 / cs, wt = -1.0 / ct;
  // The channel form needs no normalised copy of the inputs (see its case); the others do.
  NormalizedRows rows;
  at::Tensor xs, xt;
  if (kind != NstKernel::PolyChannel) {
    rows = normalize_rows(fs, ft, gd, acc);
    xs = rows.student();
    xt = rows.teacher();
  }
  auto per_sample = at::zeros({batch}, fs.options().dtype(acc));
  at::Tensor aux;
  switch (kind) {
    case NstKernel::Linear: {
      aux = at::sum(xs, {1}, false, acc).mul_(ws).add_(at::sum(xt, {1}, false, acc), wt);
      P::add_sum_of_squares(aux, 1.0, per_sample);
      break;
    }
    case NstKernel::PolyChannel: {
      // Grams of the raw rows scaled by the inverse row norms afterwards, K = diag(r) F F^T diag(r):
      // no normalised copy of the inputs is written and read back (B (Cs + Ct) HW values), only
      // Gram-sized scaling. The row norms go into aux too, so the backward does not recompute them.
      aux = at::empty({nst_poly_channel_aux_size(batch, cs, ct)}, per_sample.options());
      const auto layout = nst_poly_channel_aux(aux, batch, cs, ct);
      layout.norms.copy_(row_norms(fs, ft, acc));
      const auto r = layout.norms.clamp_min(kNormalizeEps).reciprocal();
      const auto r_s = r.narrow(1, 0, cs), r_t = r.narrow(1, cs, ct);
      const auto raw_s = rows_of(fs).to(gd), raw_t = rows_of(ft).to(gd);
      auto k_ss = layout.k_ss, k_st = layout.k_st, k_tt = layout.k_tt;
      P::bmm_out(k_ss, raw_s, raw_s.transpose(1, 2));
      P::bmm_out(k_st, raw_s, raw_t.transpose(1, 2));
      P::bmm_out(k_tt, raw_t, raw_t.transpose(1, 2));
      k_ss.mul_(r_s.unsqueeze(2)).mul_(r_s.unsqueeze(1));
      k_st.mul_(r_s.unsqueeze(2)).mul_(r_t.unsqueeze(1));
      k_tt.mul_(r_t.unsqueeze(2)).mul_(r_t.unsqueeze(1));
      P::add_sum_of_squares(k_ss.view({batch, -1}), ws * ws, per_sample);
      P::add_sum_of_squares(k_st.view({batch, -1}), 2.0 * ws * wt, per_sample);
      P::add_sum_of_squares(k_tt.view({batch, -1}), wt * wt, per_sample);
      break;
    }
    case NstKernel::PolySpatial: {
      aux = at::empty({batch, hw, hw}, per_sample.options());
      P::bmm_out(aux, xs.transpose(1, 2), xs);
      P::baddbmm_(aux, xt.transpose(1, 2), xt, /*beta=*/ws, /*alpha=*/wt);
      P::add_sum_of_squares(aux.view({batch, -1}), 1.0, per_sample);
      break;
    }
    case NstKernel::Gaussian: {
      aux = at::empty({0}, per_sample.options());
      for_each_gaussian_tile<P>(rows, sigma, {true, true}, /*keep_diagonal=*/true,
                                [&](int part, int64_t n0, int64_t nb, int64_t, int64_t, const at::Tensor&,
                                    const at::Tensor& sums) {
                                  per_sample.narrow(0, n0, nb).add_(sums.sum(1), part == 0 ? ws : wt);
                                });
      break;
    }
  }
  return {reduce_per_sample(per_sample, red, fs.scalar_type()), aux};
}

// The backward builds no normalised copy of the inputs for the linear and poly kernels: with
// x_hat = diag(r) f, the channel form uses K diag(r) (Gram-sized) against the raw rows, and the
// spatial form computes f M and hands r to normalize_rows_backward as a per-row factor.
template <class P>
std::tuple<at::Tensor, at::Tensor> nst_loss_backward_impl(const at::Tensor& grad_loss, const at::Tensor& fs,
                                                          const at::Tensor& ft, const at::Tensor& aux,
                                                          c10::string_view kernel, c10::string_view reduction,
                                                          double sigma, std::array<bool, 2> output_mask) {
  const auto kind = parse_nst_kernel(kernel);
  const auto red = parse_reduction(reduction);
  const auto acc = accumulate_type(fs.scalar_type());
  const auto gd = P::gemm_dtype(fs.scalar_type());
  const int64_t batch = fs.size(0), cs = fs.size(1), ct = ft.size(1), hw = fs.size(2) * fs.size(3);
  const std::array<double, 2> w{1.0 / cs, -1.0 / ct};
  const std::array<at::Tensor, 2> f{fs, ft};
  const std::array<int64_t, 2> offset{0, cs}, channels{cs, ct};
  const auto coeff = per_sample_grad(grad_loss, red, batch, acc);

  // The gaussian kernel needs the normalised rows themselves; the others only their norms.
  NormalizedRows rows;
  at::Tensor norms;
  if (kind == NstKernel::Gaussian) {
    rows = normalize_rows(fs, ft, gd, acc);
    norms = rows.norms;
  } else if (kind == NstKernel::PolyChannel) {
    norms = nst_poly_channel_aux(aux, batch, cs, ct).norms;  // saved by the forward
  } else {
    norms = row_norms(fs, ft, acc);
  }
  // Only the poly forms use these: 1 / max(norm, eps) per row and the raw rows as GEMM operands
  // (a copy for half inputs on CPU, so it is not made for the other kernels).
  std::array<at::Tensor, 2> r, raw;
  if (kind == NstKernel::PolyChannel || kind == NstKernel::PolySpatial) {
    const auto rnorm = norms.clamp_min(kNormalizeEps).reciprocal();
    for (int part = 0; part < 2; ++part) {
      r[part] = rnorm.narrow(1, offset[part], channels[part]).contiguous();
      raw[part] = rows_of(f[part]).to(gd);
    }
  }

  // g[part] (B, C_part, HW): dL/dx_hat up to the factor `factor * w_part * coeff[n]` and the
  // per-row factor row_scale[part] (undefined: 1).
  std::array<at::Tensor, 2> g, row_scale;
  double factor = 0;
  auto new_grad = [&](int part) { return at::empty({batch, channels[part], hw}, fs.options().dtype(acc)); };
  switch (kind) {
    case NstKernel::Linear: {
      factor = 2.0;
      for (int part = 0; part < 2; ++part) g[part] = aux.unsqueeze(1).expand({batch, channels[part], hw});
      break;
    }
    case NstKernel::PolyChannel: {
      factor = 4.0;
      const auto layout = nst_poly_channel_aux(aux, batch, cs, ct);
      const auto &k_ss = layout.k_ss, &k_st = layout.k_st, &k_tt = layout.k_tt;
      // G_s = K_ss X_s w_s + K_st X_t w_t;  G_t = K_ts X_s w_s + K_tt X_t w_t;  K X = (K diag(r)) f
      const std::array<at::Tensor, 2> k_self{k_ss, k_tt}, k_cross{k_st, k_st.transpose(1, 2)};
      for (int part = 0; part < 2; ++part) {
        if (!output_mask[part]) continue;
        const int other = 1 - part;
        g[part] = new_grad(part);
        P::bmm_out(g[part], (k_self[part] * r[part].unsqueeze(1)).to(gd), raw[part]);
        P::baddbmm_(g[part], (k_cross[part] * r[other].unsqueeze(1)).to(gd), raw[other], /*beta=*/w[part],
                    /*alpha=*/w[other]);
      }
      break;
    }
    case NstKernel::PolySpatial: {
      factor = 4.0;
      const auto m = aux.to(gd);
      for (int part = 0; part < 2; ++part) {
        if (!output_mask[part]) continue;
        g[part] = new_grad(part);
        P::bmm_out(g[part], raw[part], m);  // X_hat M = diag(r) (f M)
        row_scale[part] = r[part];
      }
      break;
    }
    case NstKernel::Gaussian: {
      factor = 2.0 / (sigma * sigma);
      for (int part = 0; part < 2; ++part)
        if (output_mask[part]) g[part] = new_grad(part);
      const std::array<at::Tensor, 2> x{rows.student(), rows.teacher()};
      const auto& x_all = rows.x_hat;
      for_each_gaussian_tile<P>(rows, sigma, output_mask, /*keep_diagonal=*/false,
                                [&](int part, int64_t n0, int64_t nb, int64_t r0, int64_t tr,
                                    const at::Tensor& weights, const at::Tensor& sums) {
                                  auto g_tile = g[part].narrow(0, n0, nb).narrow(1, r0, tr);
                                  const auto x_tile = x[part].narrow(0, n0, nb).narrow(1, r0, tr);
                                  P::bmm_out(g_tile, weights.to(gd), x_all.narrow(0, n0, nb));
                                  g_tile.addcmul_(x_tile, sums.unsqueeze(2), -1.0);
                                });
      break;
    }
  }
  std::array<at::Tensor, 2> grads{unused_grad(fs), unused_grad(ft)};
  for (int part = 0; part < 2; ++part) {
    if (!output_mask[part]) continue;
    grads[part] = at::empty(f[part].sizes(), f[part].options());
    const auto scale = (coeff * (factor * w[part])).contiguous();
    P::normalize_rows_backward(g[part], row_scale[part], f[part],
                               norms.narrow(1, offset[part], channels[part]).contiguous(), scale, kNormalizeEps,
                               grads[part]);
  }
  return {grads[0], grads[1]};
}

}  // namespace kdfast
