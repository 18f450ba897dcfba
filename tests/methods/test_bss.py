"""BSS (Heo et al., AAAI 2019): base-sample selection, target sampling, the boundary attack, the
loss and its weights against the float64 re-statement of the official rules (kdfast.testing.reference),
the official per-element formulation (kdfast.testing.baselines), a statistical test of the sampler,
and bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import feature_map
from torch import nn

from kdfast.methods import bss
from kdfast.testing import baselines, reference

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))
DEVICES = ["cpu", CUDA]


# ------------------------------------------------------------------------------------------ helpers
class SmallCNN(nn.Module):
    """conv-BN-relu-conv-relu-pool-linear: a teacher with batch norm (eval mode in the attack)."""

    def __init__(self, c=3, k=7, width=6):
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.fc = nn.Linear(2 * width, k)
        with torch.no_grad():  # non-trivial running statistics
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean(dim=(2, 3)))


class Counting(nn.Module):
    """Wraps a teacher and records the batch size of every call."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.net(x)


class Linear2(nn.Module):
    """Two-class linear teacher f(x) = W flatten(x): grad_x (f_1 - f_0) = W_1 - W_0 everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.w.t()


def _teacher(c=3, k=7, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    return SmallCNN(c, k).to(device=device, dtype=dtype).eval().requires_grad_(False)


def _attack_inputs(teacher, shape, dtype=torch.float64, device="cpu", layout="contiguous", seed=1):
    torch.manual_seed(seed)
    x = feature_map(shape, dtype=dtype, device=device, layout=layout)
    with torch.no_grad():
        t_logits = teacher(x)
    return x, bss.sample_target_classes(t_logits, torch.Generator(device=device).manual_seed(seed))


# ------------------------------------------------------------------------------------------ weights, loss
@pytest.mark.parametrize("epochs", [1, 3, 7, 80])
def test_weights_match_reference(epochs):
    for e in range(1, epochs + 1):
        assert bss.bss_weights(e, epochs) == pytest.approx(reference.bss_weights(e, epochs), abs=1e-15)
    assert bss.bss_weights(epochs, epochs) == (1.0, 0.0)


def test_weights_schedule_points():
    assert bss.bss_weights(1, 80) == pytest.approx((3 * 79 / 80 + 1, 2 * (1 - 4 / 240)))
    assert bss.bss_weights(60, 80)[1] == 0.0 and bss.bss_weights(59, 80)[1] > 0.0  # zero for the last quarter


@pytest.mark.parametrize("args", [(0, 10), (11, 10), (1, 0), (1.0, 10), (True, 3)])
def test_weights_bad_input(args):
    with pytest.raises(ValueError, match="epoch"):
        bss.bss_weights(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 10), (5, 3), (64, 100)], ids=str)
def test_soft_cross_entropy_matches_reference(device, shape):
    s = (3 * torch.randn(*shape, dtype=torch.float64, device=device)).requires_grad_()
    t = 3 * torch.randn(*shape, dtype=torch.float64, device=device)
    out = bss.bss_loss(s, t, temperature=3.0)
    ref = reference.bss_soft_ce(s, t, 3.0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    (g,) = torch.autograd.grad(out, s)
    (r,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


def test_soft_cross_entropy_gradcheck_and_no_teacher_gradient():
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: bss.soft_cross_entropy(a, t, 2.5), (s,))
    bss.soft_cross_entropy(s, t).backward()
    assert t.grad is None  # the teacher side is a target


def test_soft_cross_entropy_no_rows_is_zero_with_graph():
    s = torch.randn(0, 5, requires_grad=True)
    out = bss.bss_loss(s, torch.randn(0, 5))
    assert out.item() == 0.0 and out.requires_grad


def test_soft_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        bss.soft_cross_entropy(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        bss.soft_cross_entropy(torch.randn(3, 4), torch.randn(3, 4), temperature=0)
    with pytest.raises(ValueError, match="2-D"):
        bss.soft_cross_entropy(torch.randn(3), torch.randn(3))


# ------------------------------------------------------------------------------------------ base samples
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k", [(1, 10), (7, 3), (33, 10), (200, 10)])
@pytest.mark.parametrize("max_samples", [None, 1, 5, 64])
@pytest.mark.parametrize("both", [False, True])
def test_select_base_samples_matches_reference(device, n, k, max_samples, both):
    t = 2 * torch.randn(n, k, dtype=torch.float64, device=device)
    s = 2 * torch.randn(n, k, dtype=torch.float64, device=device)
    y = torch.where(torch.rand(n, device=device) < 0.7, t.argmax(1), torch.randint(0, k, (n,), device=device))
    out = bss.select_base_samples(t, s, y, max_samples, require_student_correct=both)
    ref = reference.bss_select_base_samples(t.cpu(), s.cpu(), y.cpu(), max_samples, both)
    assert out.dtype == torch.int64 and out.device.type == device
    assert out.cpu().tolist() == ref.tolist()


@pytest.mark.parametrize("n,k,max_samples", [(1, 10, 64), (40, 10, 64), (256, 10, 64), (300, 100, 16)])
def test_default_base_samples_are_the_official_codes(n, k, max_samples):
    """The default rule is the official code's at HEAD: teacher AND student correct, then top scores."""
    torch.manual_seed(n + k)
    t = 3 * torch.randn(n, k, dtype=torch.float64)
    s = 3 * torch.randn(n, k, dtype=torch.float64)
    # most labels agree with the teacher, a third of them with the student too: every case occurs
    y = torch.where(torch.rand(n) < 0.8, t.argmax(1), torch.randint(0, k, (n,)))
    y = torch.where(torch.rand(n) < 0.3, s.argmax(1), y)
    out = bss.select_base_samples(t, s, y, max_samples)
    official = baselines.bss_official_base_samples(t, s, y, attack_size=max_samples)
    assert out.tolist() == official.tolist()
    assert (s[out].argmax(1) == y[out]).all() and (t[out].argmax(1) == y[out]).all()


def test_teacher_only_option_keeps_student_mistakes():
    """require_student_correct=False is the official code's first commit: on random logits it keeps
    samples the student gets wrong, which the default never does."""
    torch.manual_seed(0)
    t, s = torch.randn(256, 10), torch.randn(256, 10)
    y = t.argmax(1)
    teacher_only = bss.select_base_samples(t, s, y, 64, require_student_correct=False)
    default = bss.select_base_samples(t, s, y, 64)
    assert (s[teacher_only].argmax(1) != y[teacher_only]).any()
    assert (s[default].argmax(1) == y[default]).all()
    assert bss.OPTIONS["require_student_correct"] is True


def test_select_base_samples_float32_and_non_contiguous_logits():
    t64, s64 = 2 * torch.randn(10, 90, dtype=torch.float64), 2 * torch.randn(10, 90, dtype=torch.float64)
    y = t64.argmax(0)  # (90,)
    t, s = t64.float().t(), s64.float().t()  # (90, 10), column-major
    assert not t.is_contiguous()
    out = bss.select_base_samples(t, s, y, 16)
    assert out.tolist() == reference.bss_select_base_samples(t64.t(), s64.t(), y, 16).tolist()


def test_select_base_samples_none_qualifies_and_single():
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    s = torch.zeros(2, 3)
    empty = bss.select_base_samples(t, s, torch.tensor([1, 2]))
    assert empty.dtype == torch.int64 and empty.shape == (0,)
    # One base sample: a 1-element index (the official squeeze() made it 0-d and crashed on .shape[0]).
    one = bss.select_base_samples(t, s, torch.tensor([0, 2]))
    assert one.tolist() == [0]


def test_select_base_samples_keeps_the_largest_scores():
    t = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0]])
    s = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 1.0]])  # scores: 0, large, medium
    y = torch.zeros(3, dtype=torch.int64)  # the student is wrong on rows 1 and 2: teacher-only ranking
    assert bss.select_base_samples(t, s, y, 2, require_student_correct=False).tolist() == [1, 2]
    assert bss.select_base_samples(t, s, y, 3, require_student_correct=False).tolist() == [0, 1, 2]
    assert bss.select_base_samples(t, s, y, 3).tolist() == [0]


def test_select_base_samples_bad_input():
    t, s = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="max_samples"):
        bss.select_base_samples(t, s, torch.zeros(4, dtype=torch.int64), 0)
    with pytest.raises(TypeError, match="targets must be int64"):
        bss.select_base_samples(t, s, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"targets must have shape \(4,\)"):
        bss.select_base_samples(t, s, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="same shape"):
        bss.select_base_samples(t, torch.randn(4, 5), torch.zeros(4, dtype=torch.int64))


# ------------------------------------------------------------------------------------------ target classes
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,k", [(1, 2), (9, 3), (64, 10), (5, 100)])
def test_target_classes_match_reference_for_given_uniforms(device, dtype, n, k):
    t = (2 * torch.randn(n, k, dtype=torch.float64, device=device)).to(dtype)
    u = torch.rand(n, dtype=torch.float64, device=device)
    out = bss.sample_target_classes(t, uniforms=u)
    assert out.dtype == torch.int64 and out.device.type == device
    assert out.cpu().tolist() == reference.bss_target_from_uniform(t.cpu(), u.cpu()).tolist()
    assert not (out == t.argmax(1)).any()


def test_target_classes_generator_reproducible_and_never_top1():
    t = 3 * torch.randn(500, 10)
    a = bss.sample_target_classes(t, torch.Generator().manual_seed(3))
    b = bss.sample_target_classes(t, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not (a == t.argmax(1)).any()
    assert bss.sample_target_classes(torch.randn(0, 4)).shape == (0,)


def test_target_classes_extreme_logits_pick_a_valid_class():
    # Non-top probabilities underflow to 0 in float32: the official ">=" rule picks the second-ranked class.
    t = torch.tensor([[200.0, 0.0, -5.0], [0.0, -300.0, 400.0]])
    out = bss.sample_target_classes(t, torch.Generator().manual_seed(0))
    assert out.tolist() == [1, 0]


def _chi_square(counts, expected):
    mask = expected > 0
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


def test_target_sampling_distribution_chi_square():
    """Fixed seed: 5 rows x 4000 draws of K = 6 classes; the chi-square statistic against the official
    probabilities q_k / sum_{k' != b} q_k' stays under the 1e-6 tail bound (df = 5 x 4), which a sampler
    with any of the plausible mistakes below exceeds."""
    from scipy.stats import chi2

    rows, reps, k = 5, 4000, 6
    torch.manual_seed(0)
    logits = torch.randn(rows, k, dtype=torch.float64) * 1.5
    t = logits.repeat_interleave(reps, dim=0)
    p = reference.bss_target_probabilities(logits)                # (rows, K)
    expected = reps * p
    bound = chi2.ppf(1 - 1e-6, df=rows * (k - 2))

    def statistic(draws):
        counts = F.one_hot(draws.view(rows, reps), k).sum(1).double()
        if (counts[expected == 0] > 0).any():                     # drew the top-1 class
            return float("inf")
        return _chi_square(counts, expected)

    good = bss.sample_target_classes(t, torch.Generator().manual_seed(1234))
    assert statistic(good) < bound

    # The test's power: the same statistic rejects wrong samplers at the same bound.
    g = torch.Generator().manual_seed(1234)
    q = F.softmax(t, 1)
    others = q.clone()
    others[torch.arange(t.shape[0]), t.argmax(1)] = 0
    uniform_others = torch.multinomial((others > 0).double(), 1, generator=g).squeeze(1)
    with_top1 = torch.multinomial(q, 1, generator=g).squeeze(1)
    tempered = torch.multinomial(F.softmax(t / 2, 1) * (others > 0), 1, generator=g).squeeze(1)  # wrong T
    u = torch.rand(t.shape[0], generator=g, dtype=torch.float64)
    q_sorted, classes = q.sort(1, descending=True)
    cdf = q_sorted[:, 1:].cumsum(1)
    pos = (cdf < (u * cdf[:, -1]).unsqueeze(1)).sum(1)
    off_by_one = classes[:, 1:].gather(1, (pos + 1).clamp(max=k - 2).unsqueeze(1)).squeeze(1)
    for wrong in (uniform_others, with_top1, tempered, off_by_one):
        assert statistic(wrong) > bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_target_sampling_has_no_host_sync_on_cuda():
    t = torch.randn(64, 10, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        out = bss.sample_target_classes(t, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.shape == (64,)


def test_target_classes_bad_input():
    with pytest.raises(ValueError, match="at least 2 classes"):
        bss.sample_target_classes(torch.randn(3, 1))
    with pytest.raises(ValueError, match="uniforms"):
        bss.sample_target_classes(torch.randn(3, 4), uniforms=torch.rand(2))
    with pytest.raises(ValueError, match="either generator or uniforms"):
        bss.sample_target_classes(torch.randn(3, 4), torch.Generator(), uniforms=torch.rand(3))
    with pytest.raises(TypeError, match="floating-point"):
        bss.sample_target_classes(torch.ones(3, 4, dtype=torch.int64))


# ------------------------------------------------------------------------------------------ the attack
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (6, 3, 7, 9), (17, 2, 8, 8)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shrink_below", [0.0, 0.75, 1.0])
def test_attack_matches_reference(device, shape, layout, shrink_below):
    teacher = _teacher(c=shape[1], device=device)
    x, k = _attack_inputs(teacher, shape, device=device, layout=layout)
    x0 = x.clone()
    counting = Counting(teacher)
    out = bss.bss_attack(counting, x, k, shrink_below=shrink_below)
    ref, calls = reference.bss_attack(teacher, x, k)
    assert out.dtype == x.dtype and out.shape == x.shape and not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(x, x0)  # the input is not modified
    assert len(counting.sizes) == calls  # one teacher call per step, the same early stop
    if shrink_below == 0.0:
        assert set(counting.sizes) == {shape[0]}


def test_attack_matches_official_formulation():
    teacher = _teacher()
    x, k = _attack_inputs(teacher, (12, 3, 8, 8))
    official = baselines.bss_official_attack(teacher, x, k)
    # the official code multiplies by a float32 step size (0.3 rounded): agreement to float32 precision
    torch.testing.assert_close(bss.bss_attack(teacher, x, k), official, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps,step_size", [(1, 0.3), (3, 1.0), (25, 0.05)])
def test_attack_steps_and_step_size(steps, step_size):
    teacher = _teacher()
    x, k = _attack_inputs(teacher, (9, 3, 6, 6))
    out = bss.bss_attack(teacher, x, k, steps=steps, step_size=step_size, clamp=(-1.0, 1.5))
    ref, _ = reference.bss_attack(teacher, x, k, steps=steps, step_size=step_size, clamp=(-1.0, 1.5))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def _linear_case():
    """Two classes, D = 4: grad_x (f_1 - f_0) = g with ||g|| = 3, so step_size 0.3 gives
    L_{i+1} + 1e-4 = 0.1 (L_i + 1e-4) for the margin L = f_0 - f_1 of a sample that moves (no clamp)."""
    g = torch.tensor([2.0, 1.0, 2.0, 0.0], dtype=torch.float64)     # ||g|| = 3
    w = torch.stack([torch.zeros(4, dtype=torch.float64), g])        # f_0 = 0, f_1 = g . x
    direction = g / 3
    margins = torch.tensor([0.0005, 0.05, 5e6], dtype=torch.float64)  # cross after 1, 3, never (10 steps)
    x = (-margins[:, None] / 3) * direction + torch.tensor([0.0, 0.0, 0.0, 0.7], dtype=torch.float64)
    return Linear2(w), x.view(3, 1, 2, 2), margins


def test_attack_early_stop_and_the_sample_that_stops_first():
    teacher, x, margins = _linear_case()
    target = torch.ones(3, dtype=torch.int64)
    counting = Counting(teacher)
    out = bss.bss_attack(counting, x, target, clamp=None)
    ref, calls = reference.bss_attack(teacher, x, target, clamp=None)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    margin_out = -(teacher(out)[:, 1] - teacher(out)[:, 0])
    # sample 0 stopped after 1 step, sample 1 after 3 (each just past the boundary); sample 2 moved 10 times
    expected = torch.stack([0.1 * (margins[0] + 1e-4), 0.1**3 * (margins[1] + 1e-4),
                            0.1**10 * (margins[2] + 1e-4)]) - 1e-4
    torch.testing.assert_close(margin_out, expected, rtol=1e-9, atol=1e-8)
    assert (margin_out[:2] < 0).all() and margin_out[2] > 0
    assert calls == 10 and len(counting.sizes) == 10
    # shrink at the first stop: 3 rows at steps 0-1, then 2 (sample 0 dropped), then 1 after step 3
    assert counting.sizes == [3, 3, 2, 2, 1, 1, 1, 1, 1, 1]

    # Without the never-crossing sample the attack ends early: steps 0-2 move, step 3 sees all stopped.
    counting = Counting(teacher)
    out2 = bss.bss_attack(counting, x[:2], target[:2], clamp=None, shrink_below=0.0)
    assert counting.sizes == [2, 2, 2, 2]
    torch.testing.assert_close(out2, out[:2], rtol=1e-12, atol=1e-14)


def test_attack_clamps_every_step():
    teacher, x, _ = _linear_case()
    target = torch.ones(3, dtype=torch.int64)
    x = x.clone()
    x[0, 0, 1, 1] = 4.0  # outside the range before the attack: clamped at the first step (official)
    out = bss.bss_attack(teacher, x, target, clamp=(-0.5, 0.5))
    ref, _ = reference.bss_attack(teacher, x, target, clamp=(-0.5, 0.5))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    assert out.max() <= 0.5 and out.min() >= -0.5
    assert (out == 0.5).any() and out[0, 0, 1, 1] == 0.5


def test_attack_zero_gradient_moves_nothing():
    class Flat(nn.Module):  # logits (1, 0) whatever x is: the gradient is zero
        def forward(self, x):
            zero = 0.0 * x.flatten(1).sum(1)
            return torch.stack([zero + 1.0, zero], dim=1)

    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    out = bss.bss_attack(Flat(), x, torch.ones(2, dtype=torch.int64))
    assert torch.equal(out, x)  # the official code would give NaN (0 / 0)


def test_attack_no_gradient_into_teacher_and_modes_restored():
    wrapper = Counting(_teacher())  # in train mode, its teacher in eval mode: both modes are kept
    x, k = _attack_inputs(wrapper.net, (3, 3, 6, 6))
    bss.bss_attack(wrapper, x, k)
    assert wrapper.training and not wrapper.net.training and not wrapper.net.bn.training

    teacher = _teacher().train()
    teacher.requires_grad_(True)
    x, k = _attack_inputs(teacher.eval(), (5, 3, 6, 6))
    teacher.train()
    out = bss.bss_attack(teacher, x, k)
    assert teacher.training and all(p.grad is None for p in teacher.parameters())
    ref, _ = reference.bss_attack(teacher.eval(), x, k)  # the attack ran in eval mode
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_attack_empty_batch_calls_no_teacher():
    counting = Counting(_teacher())
    out = bss.bss_attack(counting, torch.randn(0, 3, 4, 4), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 3, 4, 4) and counting.sizes == []


def test_attack_under_no_grad_context():
    teacher = _teacher()
    x, k = _attack_inputs(teacher, (4, 3, 6, 6))
    with torch.no_grad():
        out = bss.bss_attack(teacher, x, k)
    torch.testing.assert_close(out, reference.bss_attack(teacher, x, k)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_attack_autocast_teacher_in_low_precision_update_in_float32(device, input_dtype):
    amp = torch.bfloat16
    teacher = _teacher(dtype=torch.float32, device=device)
    x, k = _attack_inputs(teacher, (6, 3, 8, 8), dtype=torch.float32, device=device)
    x = x.to(input_dtype)
    seen = []
    hook = teacher.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    with torch.autocast(device, dtype=amp):
        one = bss.bss_attack(teacher, x, k, steps=1)
        full = bss.bss_attack(teacher, x, k)
    hook.remove()
    assert all(i == torch.float32 and o == amp for i, o in seen)  # float32 x in, autocast-dtype logits out
    assert one.dtype == input_dtype and full.dtype == input_dtype and torch.isfinite(full.float()).all()
    # one step by hand: the update computed in float32 from the autocast logits
    xs = x.float().requires_grad_()
    with torch.autocast(device, dtype=amp):
        logits = teacher(xs).float()
    b = logits.argmax(1)
    f_b, f_k = logits.gather(1, b[:, None])[:, 0], logits.gather(1, k[:, None])[:, 0]
    (g,) = torch.autograd.grad((f_k - f_b).sum(), xs)
    step = 0.3 * ((f_b - f_k).detach() + 1e-4) / g.flatten(1).norm(dim=1)
    expected = (xs.detach() + step.view(-1, 1, 1, 1) * g).clamp(-2.5, 2.5)
    torch.testing.assert_close(one.float(), expected.to(input_dtype).float(), rtol=1e-6, atol=1e-6)


def test_attack_bad_input():
    teacher = _teacher(k=4)
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        top = teacher(x).argmax(1)
    ok = (top + 1) % 4
    with pytest.raises(TypeError, match="target_classes must be int64"):
        bss.bss_attack(teacher, x, ok.int())
    with pytest.raises(ValueError, match=r"target_classes must have shape \(3,\)"):
        bss.bss_attack(teacher, x, ok[:2])
    with pytest.raises(ValueError, match=r"target_classes must be in \[0, 4\)"):
        bss.bss_attack(teacher, x, ok + 4)
    with pytest.raises(ValueError, match="must differ from the teacher's top-1"):
        bss.bss_attack(teacher, x, top)
    with pytest.raises(ValueError, match="steps"):
        bss.bss_attack(teacher, x, ok, steps=0)
    with pytest.raises(ValueError, match="step_size"):
        bss.bss_attack(teacher, x, ok, step_size=-0.1)
    with pytest.raises(ValueError, match="clamp"):
        bss.bss_attack(teacher, x, ok, clamp=(1.0, -1.0))
    with pytest.raises(ValueError, match="shrink_below"):
        bss.bss_attack(teacher, x, ok, shrink_below=1.5)
    with pytest.raises(ValueError, match="x must be a floating-point"):
        bss.bss_attack(teacher, torch.ones(3, 3, 5, 5, dtype=torch.int64), ok)
    with pytest.raises(ValueError, match="must return logits"):
        bss.bss_attack(lambda z: z.flatten(1).sum(1), x, ok)


# ------------------------------------------------------------------------------------------ the trainer
from distill_helpers import TinyNet, synthetic  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from kdfast.distill import Distiller  # noqa: E402
from kdfast.methods.bss import BSSDistiller, SoftCrossEntropy  # noqa: E402

DDP_GLOBAL_BATCH = 8


def _labelled_by_teacher(teacher, n=32, agree=0.75, seed=0):
    """Synthetic images whose label is the teacher's prediction for ``agree`` of them (base samples)."""
    x, y = synthetic(n, seed=seed).tensors
    with torch.no_grad():
        pred = teacher(x).argmax(1)
    g = torch.Generator().manual_seed(seed)
    y = torch.where(torch.rand(n, generator=g) < agree, pred, y)
    return TensorDataset(x, y)


def _near_copy(teacher, noise=0.3, seed=0):
    """A student that is the teacher plus noise: it agrees with the teacher on most inputs, so the
    official rule (teacher AND student correct) has base samples, and disagrees on some."""
    g = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p += noise * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return student


def _labelled_for_both(teacher, student, n=12, seed=0):
    """``n`` synthetic images labelled with the teacher's prediction, those the student predicts alike
    first (base samples of the official rule); asserts there is at least one."""
    x, _ = synthetic(8 * n, seed=seed).tensors
    with torch.no_grad():
        t, s = teacher(x).argmax(1), student(x).argmax(1)
    rows = torch.cat([(t == s).nonzero().squeeze(1), (t != s).nonzero().squeeze(1)])[:n]
    assert (t[rows] == s[rows]).any(), "no sample both models classify alike: change the seed"
    return TensorDataset(x[rows], t[rows])


def build_ddp_case(world_size):
    """TinyNet teacher/student (no BatchNorm), max_samples 3 of a global batch of 8 (the selection
    truncates across ranks), BSS weight > 0 in both epochs."""
    torch.manual_seed(1)
    teacher, student = TinyNet(8), TinyNet(4)
    data = _labelled_by_teacher(teacher)
    d = BSSDistiller(teacher, student, max_samples=3, attack_steps=4, step_size=0.5, schedule_epochs=8,
                     lr=0.1, seed=5, device="cpu", progress=False)
    loader = DataLoader(data, batch_size=DDP_GLOBAL_BATCH // world_size, shuffle=True)
    return d, loader, student


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_bss_ddp_matches_single_process(tmp_path):
    from helpers import load_ranks_assert_identical, run_torchrun

    run_torchrun("bss_ddp_worker.py", tmp_path)
    r0, r1 = load_ranks_assert_identical(tmp_path, ("student",))
    d, loader, student = build_ddp_case(1)
    history = d.fit(loader, epochs=2)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(r0["student"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(r0["history"], history):
        for key in ("loss", "loss/ce", "loss/kd", "loss/bss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a["loss/bss"] > 0
    # each rank attacked its own part of the global selection: together the single process's samples
    assert r0["stats"]["attacked"] + r1["stats"]["attacked"] == d.bss_epoch_stats["attacked"] > 0
    assert r0["stats"]["attacked"] > 0 and r1["stats"]["attacked"] > 0
    assert d.bss_epoch_stats["attacked"] <= 3 * d.bss_epoch_stats["steps"]


def _plain_kd(teacher, student, epochs, **kw):
    """CE + the official soft-CE KD with the BSS schedule's KD weight, on the plain engine."""
    from kdfast.methods.bss import _weights

    return Distiller(teacher, student, {"ce": nn.CrossEntropyLoss(),
                                        "kd": (SoftCrossEntropy(3.0), lambda e: _weights(e + 1, epochs)[0])},
                     epochs=epochs, **kw)


def test_step_without_base_samples_is_a_normal_kd_step():
    torch.manual_seed(2)
    teacher, student = TinyNet(8), TinyNet(4)
    x, _ = synthetic(16).tensors
    with torch.no_grad():
        wrong = (teacher(x).argmax(1) + 1) % 5  # the teacher is never right: no base sample
    data = TensorDataset(x, wrong)
    student2 = TinyNet(4)
    student2.load_state_dict(student.state_dict())
    kw = dict(lr=0.1, seed=3, device="cpu", progress=False)
    d = BSSDistiller(teacher, student, epochs=2, **kw)
    h = d.fit(DataLoader(data, batch_size=4, shuffle=True))
    ref = _plain_kd(teacher, student2, 2, **kw)
    ref.fit(DataLoader(data, batch_size=4, shuffle=True))
    assert d.bss_epoch_stats["bss_steps"] == 0 and all(r["loss/bss"] == 0 for r in h)
    for (k, v), v2 in zip(student.state_dict().items(), student2.state_dict().values()):
        torch.testing.assert_close(v, v2, rtol=0, atol=0, msg=k)


def test_bss_step_matches_manual_official_step():
    """One step on one batch = CE + kd_w softCE + bss_w softCE(attacked) by hand, with the same draws."""
    torch.manual_seed(4)
    teacher = TinyNet(8)
    student = _near_copy(teacher)
    data = _labelled_for_both(teacher, student, n=12, seed=1)
    teacher.double(), student.double()
    x, y = data.tensors[0].double(), data.tensors[1]
    manual = TinyNet(8).double()
    manual.load_state_dict(student.state_dict())
    d = BSSDistiller(teacher, student, max_samples=5, epochs=10, lr=0.1, momentum=0.0, weight_decay=0.0,
                     seed=9, device="cpu", progress=False)
    d.on_epoch_start(0)
    out = d.training_step((x, y))
    assert out["parts"]["bss"] > 0
    # by hand, from the official rules (float64 oracle)
    kd_w, bss_w = reference.bss_weights(1, 10)
    t, s = teacher(x), manual(x)
    loss = F.cross_entropy(s, y) + kd_w * reference.bss_soft_ce(s, t, 3.0)
    idx = reference.bss_select_base_samples(t.detach(), s.detach(), y, 5)
    assert idx.numel() > 0
    from kdfast.distill import mix_seed
    u = torch.rand(12, generator=torch.Generator().manual_seed(mix_seed(9, 0, 7)))[idx]
    k = reference.bss_target_from_uniform(t.detach()[idx], u)
    x_adv, _ = reference.bss_attack(teacher, x[idx], k)
    loss = loss + bss_w * reference.bss_soft_ce(manual(x_adv), teacher(x_adv).detach(), 3.0)
    loss.backward()
    with torch.no_grad():
        for p in manual.parameters():
            p -= 0.1 * p.grad
    # the engine computes the losses in float32 (from float64 logits here): float32 agreement
    for (name, a), b in zip(student.state_dict().items(), manual.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_bss_resume_is_exact(tmp_path):
    """Two epochs in one run = one epoch, then a new BSSDistiller resuming from the checkpoint (the
    target draws are a function of (seed, step), so nothing else needs saving)."""
    def make(ckpt, resume):
        torch.manual_seed(3)
        teacher, student = TinyNet(8), TinyNet(4)
        d = BSSDistiller(teacher, student, max_samples=4, schedule_epochs=8, epochs=2, lr=0.1, seed=2, device="cpu",
                         progress=False, checkpoint_dir=str(ckpt), resume=resume)
        return d, student, DataLoader(_labelled_by_teacher(teacher, n=16), batch_size=4, shuffle=True)

    d, full, loader = make(tmp_path / "a", False)
    d.fit(loader)
    d, _, loader = make(tmp_path / "b", False)
    d.fit(loader, epochs=1)
    d, resumed, loader = make(tmp_path / "b", True)
    history = d.fit(loader)
    assert len(history) == 2 and history[1]["loss/bss"] > 0
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_bss_weight_zero_in_last_quarter_skips_the_attack():
    torch.manual_seed(5)
    teacher, student = TinyNet(8), TinyNet(4)
    data = _labelled_by_teacher(teacher, n=8)
    d = BSSDistiller(teacher, student, epochs=4, lr=0.05, device="cpu", progress=False)
    h = d.fit(DataLoader(data, batch_size=4))
    assert [r["loss/bss"] > 0 for r in h] == [True, True, False, False]  # beta(3/4) = beta(1) = 0
    assert d.bss_epoch_stats["bss_steps"] == 0


def test_bss_bf16_autocast_step():
    torch.manual_seed(6)
    teacher = TinyNet(8)
    student = _near_copy(teacher)
    data = _labelled_for_both(teacher, student, n=16)
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype, i[0].requires_grad)))
    before = [p.detach().clone() for p in student.parameters()]
    d = BSSDistiller(teacher, student, epochs=4, amp="bf16", lr=0.05, device="cpu", progress=False)
    h = d.fit(DataLoader(data, batch_size=8))
    attack_calls = [s for s in seen if s[2]]  # the attack's calls differentiate w.r.t. the input
    assert attack_calls and all(i == torch.float32 and o == torch.bfloat16 for i, o, _ in attack_calls)
    assert h[0]["loss/bss"] > 0 and all(torch.isfinite(torch.tensor(r["loss"])) for r in h)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_build_defaults_and_bad_options():
    torch.manual_seed(7)
    d = bss.build(TinyNet(8), TinyNet(4), device="cpu", progress=False)
    assert d.epochs == 80 and d.temperature == 3.0 and d.max_samples == 64 and d.attack["steps"] == 10
    assert d.scheduler is None and list(d._student_spec.milestones) == [40, 60]
    assert d.optimizer.param_groups[0]["lr"] == 0.1 and d.optimizer.param_groups[0]["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="max_samples"):
        BSSDistiller(TinyNet(8), TinyNet(4), max_samples=0, device="cpu")
    with pytest.raises(ValueError, match="temperature"):
        BSSDistiller(TinyNet(8), TinyNet(4), temperature=-1.0, device="cpu")
    with pytest.raises(ValueError, match="needs a teacher"):
        BSSDistiller(None, TinyNet(4), device="cpu")


def test_registered():
    from kdfast import methods

    assert "bss" in methods.available() and methods.get("bss") is bss
    methods.check_options("bss", {"max_samples": 32, "device": "cpu"})
    with pytest.raises(ValueError, match="no option"):
        methods.check_options("bss", {"attack_size": 3})


def test_a_lone_base_sample_with_a_batchnorm_student_adds_no_term():
    """One qualifying sample cannot pass a train-mode BatchNorm with 1x1 maps: the step is CE + KD."""
    torch.manual_seed(8)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    student = nn.Sequential(nn.Conv2d(3, 4, 8), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 5))
    x, _ = synthetic(8).tensors
    with torch.no_grad():
        t, s = teacher(x).argmax(1), student.eval()(x).argmax(1)
    student.train()
    y = (t + 1) % 5                                 # nobody qualifies ...
    lone = int((t == s).nonzero()[0]) if (t == s).any() else 0
    with torch.no_grad():                           # ... but one sample both models get right
        student[3].bias[t[lone]] += 100.0
        s = student.eval()(x).argmax(1)
    student.train()
    y[lone] = t[lone]
    assert int(((t == y) & (s == y)).sum()) == 1
    d = BSSDistiller(teacher, student, epochs=4, lr=0.05, device="cpu", progress=False)
    d.on_epoch_start(0)
    out = d.training_step((x, y))
    assert float(out["parts"]["bss"]) == 0.0 and d.bss_epoch_stats["bss_steps"] == 0


def test_kd_scale_multiplies_the_official_kd_weight_in_bss_and_the_kd_baseline():
    from kdfast.methods.bss import kd_baseline

    teacher, student = TinyNet(8), TinyNet(4)
    kw = dict(epochs=4, lr=0.1, device="cpu", progress=False)
    for make in (lambda **o: BSSDistiller(teacher, student, **o, **kw), lambda **o: kd_baseline(teacher, student, **o, **kw)):
        official, scaled = make(), make(kd_scale=2.5)
        for epoch in range(4):
            kd_w = reference.bss_weights(epoch + 1, 4)[0]
            assert official.weights_at(epoch)["kd"] == pytest.approx(kd_w)
            assert scaled.weights_at(epoch)["kd"] == pytest.approx(2.5 * kd_w)
        for bad in (0, -1.0, float("nan"), True, "2"):
            with pytest.raises(ValueError, match="kd_scale must be a positive finite number"):
                make(kd_scale=bad)
