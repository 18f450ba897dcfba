// Every kdfast op's schema, in one place. Kernels are registered per backend in
// csrc/ops/<backend>/<op>_kernel.{cpp,cu}; autograd in csrc/ops/autograd/<op>_autograd.cpp; fake (meta)
// kernels in kdfast/_registrations.py.
//
// Conventions: `*_backward` ops take an `output_mask` and return an empty tensor (shape (0,)) for
// each gradient that is not needed, since a schema cannot return None.
#include <torch/library.h>

TORCH_LIBRARY(kdfast, m) {
  // FSP (Yim et al. 2017): G = a b^T / (H W), per-sample squared Frobenius distance of two Grams.
  m.def("fsp_matrix(Tensor a, Tensor b) -> Tensor");
  m.def("_fsp_matrix_backward(Tensor grad, Tensor a, Tensor b, bool[2] output_mask) -> (Tensor, Tensor)");
  // Returns (loss, diff): diff = G_s - G_t (B, Ca, Cb) in the accumulate dtype, kept for backward.
  m.def("fsp_loss(Tensor s_a, Tensor s_b, Tensor t_a, Tensor t_b, str reduction) -> (Tensor, Tensor)");
  m.def(
      "_fsp_loss_backward(Tensor grad_loss, Tensor diff, Tensor s_a, Tensor s_b, Tensor t_a, Tensor t_b, "
      "str reduction, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // NST (Huang & Wang 2017) MMD^2 between normalised channel rows. kernel is one of 'linear',
  // 'poly_channel', 'poly_spatial', 'gaussian'. Returns (loss, aux); see csrc/ops/nst_impl.h.
  m.def("nst_loss(Tensor fs, Tensor ft, str kernel, str reduction, float sigma) -> (Tensor, Tensor)");
  m.def(
      "_nst_loss_backward(Tensor grad_loss, Tensor fs, Tensor ft, Tensor aux, str kernel, str reduction, "
      "float sigma, bool[2] output_mask) -> (Tensor, Tensor)");

  // Tucker-2 convolution (kdfast.ops.tucker_conv2d): y = conv1x1(last) o conv_kxk(core) o conv1x1(first) (x) + bias,
  // x (N, C, H, W), first (R_in, C), core (R_out, R_in, kh, kw), last (O, R_out), bias (O,) or None.
  // Optional inference epilogue in the same pass: y = relu?((conv + bias) * scale + shift + residual),
  // scale/shift (O,) (a folded BatchNorm), residual (N, O, H_out, W_out), relu a bool.
  // Nothing is saved for backward beyond the inputs: the backward op recomputes the intermediates.
  m.def(
      "tucker_conv2d(Tensor x, Tensor first, Tensor core, Tensor last, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, Tensor? scale=None, Tensor? shift=None, Tensor? residual=None, "
      "bool relu=False) -> Tensor");
  // Gradients for (x, first, core, last, bias).
  m.def(
      "_tucker_conv2d_backward(Tensor grad_y, Tensor x, Tensor first, Tensor core, Tensor last, int[2] stride, "
      "int[2] padding, int[2] dilation, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Training mode of tucker_conv2d: the composition, also returning its intermediates (z1, z2) =
  // (first x, core * z1) so that the backward recomputes nothing (what autograd through three convs keeps).
  m.def(
      "_tucker_conv2d_with_intermediates(Tensor x, Tensor first, Tensor core, Tensor last, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_tucker_conv2d_backward_saved(Tensor grad_y, Tensor x, Tensor first, Tensor core, Tensor last, Tensor z1, "
      "Tensor z2, int[2] stride, int[2] padding, int[2] dilation, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Which implementation tucker_conv2d runs for these arguments on their device: 'fused', 'composed', or
  // 'autotune' (CPU: the next call measures both; see csrc/ops/cpu/tucker_cpu_autotune.h). epilogue: the
  // bit mask of the call's epilogue (1 bias, 2 scale, 4 shift, 8 residual, 16 relu), part of the cache key.
  m.def(
      "_tucker_conv2d_path(Tensor x, Tensor first, Tensor core, Tensor last, int[2] stride, int[2] padding, "
      "int[2] dilation, int epilogue=0) -> str");
  // The CPU Tucker path cache (kdfast/backends/tucker.py): command 'state' (JSON), 'set' ('1', '0', ''),
  // 'clear', 'insert' (one tab-separated entry).
  m.def("_tucker_autotune(str command, str argument=\"\") -> str");
  // Hinton KD (kd_loss): (1 - alpha) CE(targets, s) + alpha c KL(softmax(t/T) || softmax(s/T)), c = T^2 if
  // t2_scale else 1; targets may be None when alpha = 1. Returns (loss, stats): stats (B, 5) per-row
  // statistics in the accumulate dtype (see csrc/include/kdfast/kd_loss_math.h), kept for backward.
  m.def(
      "kd_loss(Tensor student_logits, Tensor teacher_logits, Tensor? targets, float temperature, float alpha, "
      "bool t2_scale, int ignore_index, str reduction) -> (Tensor, Tensor)");
  m.def(
      "_kd_loss_backward(Tensor grad_loss, Tensor student_logits, Tensor teacher_logits, Tensor? targets, "
      "Tensor stats, float temperature, float alpha, bool t2_scale, int ignore_index, str reduction, "
      "bool[2] output_mask) -> (Tensor, Tensor)");

  // ---------------------------------------------------------------- Knowledge Representing (KR)
  // Sparse recoding of gradients, in place over a list of (grad, param) pairs with one threshold
  // each (kdfast's interpretation, see csrc/include/kdfast/sparse_recoding.h). taus holds the
  // thresholds used for this step and receives the next ones. No autograd: it edits .grad tensors.
  m.def(
      "sparse_recoding_(Tensor(a!)[] grads, Tensor[] params, Tensor(b!) taus, float boost, float damp, "
      "float shrink, float tau_rate) -> ()");

  // ---------------------------------------------------------------- SRM (sparse representation matching)
  // Per pixel of x (N, D, H, W): s = sigmoid(dictionary^T x + bias) over the K codewords of the
  // dictionary (D, K), bias a 1-element tensor; values (N, H, W, k) its k largest entries, descending
  // (ties: lower index first), indices (N, H, W, k) int64 their codewords. See
  // csrc/ops/sparse_codes_impl.h. Differentiable through values.
  m.def("sparse_codes(Tensor x, Tensor dictionary, Tensor bias, int k) -> (Tensor, Tensor)");
  // Gradients for (x, dictionary, bias) from grad_values and the forward's indices.
  m.def(
      "_sparse_codes_backward(Tensor grad_values, Tensor x, Tensor dictionary, Tensor bias, Tensor indices, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // The hand-written-kernel table and the current KDFAST_CUDA_KERNELS / KDFAST_CPU_KERNELS choices as
  // JSON (csrc/ops/kernel_paths.cpp; read by kdfast/info.py).
  m.def("_kernel_paths() -> str");

  // Build facts baked into the binary: [torch major, minor, patch, CUDA version (e.g. 12040) or -1].
  m.def("_build_info() -> int[]");
}
