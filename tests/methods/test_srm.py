"""kdfast.methods.srm: reconstruct and labels against the official dense formulation
(kdfast.testing.baselines, viebboy/SRM Layers.py) and the float64 oracle."""
import pytest
import torch
from helpers import LAYOUTS, feature_map

from kdfast.methods import srm
from kdfast.testing import baselines, reference

# (N, D, H, W, K, k)
SHAPES = [(1, 3, 1, 1, 6, 1), (2, 5, 3, 7, 10, 2), (3, 8, 8, 8, 16, 3), (2, 6, 5, 9, 40, 35)]


def _params(d, kk, requires_grad=True):
    c = (torch.randn(d, kk, dtype=torch.float64) / d**0.5).requires_grad_(requires_grad)
    b = torch.randn(1, dtype=torch.float64).requires_grad_(requires_grad)
    return c, b


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reconstruct_matches_official_dense_formulation(shape, layout):
    n, d, h, w, kk, k = shape
    x = feature_map((n, d, h, w), layout=layout, requires_grad=True)
    c, b = _params(d, kk)
    out = srm.reconstruct(x, c, b, k)
    official = baselines.srm_reconstruct_official(x, c, b, k)
    oracle = reference.srm_reconstruct(x, c, b, k)
    assert out.shape == (n, d, h, w)
    torch.testing.assert_close(out, official, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, oracle, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(oracle)
    got = torch.autograd.grad(out, (x, c, b), g)
    expected = torch.autograd.grad(official, (x, c, b), g)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def test_reconstruct_gradcheck():
    x = feature_map((2, 3, 2, 3), requires_grad=True)
    c, b = _params(3, 8)
    assert torch.autograd.gradcheck(lambda *a: srm.reconstruct(*a, 2), (x, c, b))


def test_reconstruct_mse_matches_official_in_float32():
    """Stage A's loss, MSE(x, C s_hat), as the official code computes it, at float32."""
    x = torch.relu(torch.randn(4, 16, 8, 8))
    c, b = torch.randn(16, 32) / 4, torch.randn(1)
    ours = torch.nn.functional.mse_loss(srm.reconstruct(x, c, b, 2), x)
    official = torch.nn.functional.mse_loss(baselines.srm_reconstruct_official(x, c, b, 2), x)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_labels_match_official_label_code(shape, layout):
    n, d, h, w, kk, k = shape
    x = feature_map((n, d, h, w), layout=layout)
    c, b = _params(d, kk, requires_grad=False)
    image, pixel = srm.labels(x, c, b, k)
    official_image, official_pixel = baselines.srm_labels_official(x, c, b, k)
    assert image.shape == (n, kk) and pixel.shape == (n, h, w) and pixel.dtype == torch.int64
    torch.testing.assert_close(image, official_image, rtol=1e-10, atol=1e-12)
    assert torch.equal(pixel, official_pixel)
    ref_image, ref_pixel = reference.srm_labels(x, c, b, k)
    torch.testing.assert_close(image, ref_image, rtol=1e-10, atol=1e-12)
    assert torch.equal(pixel, ref_pixel)


def test_labels_in_bfloat16_sum_in_float32():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    c, b = torch.randn(8, 16, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)
    image, pixel = srm.labels(x, c, b, 3)
    ref_image, _ = reference.srm_labels(x.double(), c.double(), b.double(), 3)
    assert image.dtype == torch.bfloat16
    torch.testing.assert_close(image.double(), ref_image, rtol=2e-2, atol=1e-2)


def test_official_mask_keeps_ties_kdfast_keeps_k():
    """Documented difference: with codes tied at the k-th value the official mask keeps them all."""
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0, 2.0, 0.5]], dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64)
    image, _ = srm.labels(x, c, b, 1)
    official, _ = baselines.srm_labels_official(x, c, b, 1)
    assert (image > 0).sum() == 1 and (official > 0).sum() == 2


def test_sizes_follow_the_official_rules():
    assert srm.num_codewords(128, 2.0) == 256 and srm.sparsity(128, 2.0, 0.02) == 5
    assert srm.sparsity(16, 2.0, 0.02) == 1  # int(0.64) = 0 becomes 1
    assert srm.num_codewords(96, 1.5) == 144 and srm.sparsity(256, 2.0, 0.03) == 15


def test_sparse_dictionary_module():
    torch.manual_seed(0)
    module = srm.SparseDictionary(6, 12, 2)
    assert -1 <= module.bias.item() <= 1
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(module(x), baselines.srm_reconstruct_official(x, module.dictionary, module.bias, 2))
    with pytest.raises(ValueError, match="k must be in 1..codewords"):
        srm.SparseDictionary(6, 12, 13)
