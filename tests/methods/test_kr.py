"""kdfast.methods.kr: knowledge aggregation and KRDistiller."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdfast.methods.kr import (Aggregator, KnowledgeAggregation, KRDistiller, aggregation_loss, capture_feature_shapes,
                       group_layers, teacher_anchors)
from helpers import load_ranks_assert_identical, run_torchrun
from kdfast.losses import KDLoss


# ------------------------------------------------------------------------------ aggregation
@pytest.mark.parametrize("t_shapes, s_channels, s_size", [
    ([(4, 8, 8), (6, 8, 8), (8, 4, 4)], 3, (4, 4)),      # teacher wider, mixed sizes
    ([(2, 5, 7), (3, 5, 7), (3, 3, 3)], 9, (3, 3)),       # teacher narrower, odd non-square sizes
    ([(5, 6, 6)], 5, (6, 6)),                             # one layer, same shape
])
def test_aggregator_shapes_and_formula(t_shapes, s_channels, s_size):
    agg = Aggregator([s[0] for s in t_shapes], s_channels, s_size, preserve_energy=False).double()
    with torch.no_grad():
        agg.logits.copy_(torch.randn(len(t_shapes)))
    feats = [torch.randn(2, *s, dtype=torch.float64) for s in t_shapes]
    out = agg(feats)
    assert out.shape == (2, s_channels, *s_size)
    # reference: 1x1 conv at full resolution, then pooling (the order agg uses is the reverse)
    w = torch.softmax(agg.logits, 0)
    ref = sum(w[i] * F.adaptive_avg_pool2d(F.conv2d(f, agg.projections[i].weight), s_size) for i, f in enumerate(feats))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(agg.weights().sum(), torch.tensor(1.0, dtype=torch.float64))
    # preserve_energy (the default): the same map rescaled to the group's energy at the student's size
    agg.preserve_energy = True
    energy = teacher_anchors([feats], [s_size])[0]
    torch.testing.assert_close(agg(feats), ref * (energy / ref.pow(2).mean()).sqrt())
    torch.testing.assert_close(agg(feats).pow(2).mean(), energy)


def test_aggregator_cannot_shrink_its_output():
    # The energy-preserving aggregator's output does not depend on the scale of its projections, so its
    # gradient cannot shrink it; a student that shrinks its maps is then further from the target, not closer.
    torch.manual_seed(0)
    agg = Aggregator([4, 6], 3, (4, 4)).double()
    feats = [torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 6, 4, 4, dtype=torch.float64)]
    out = agg(feats)
    with torch.no_grad():
        for p in agg.projections:
            p.weight.mul_(1e-3)
    torch.testing.assert_close(agg(feats), out)
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    anchors = teacher_anchors([feats], [(4, 4)])
    agg(feats).sub(s).pow(2).mean().backward()
    # scaling all projections together leaves the output unchanged, so the gradient has no radial part
    radial = sum((p.weight.grad * p.weight.detach()).sum() for p in agg.projections)
    torch.testing.assert_close(radial, torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)
    # a student map of zeros is as far from the target as the target's own energy: loss 1, not 0
    torch.testing.assert_close(aggregation_loss([out.detach()], [torch.zeros_like(s)], anchors),
                               torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("size, target", [((8, 8), (4, 4)), ((8, 6), (2, 3)), ((2, 2), (4, 6)), ((7, 7), (3, 3)),
                                          ((5, 5), (5, 5)), ((3, 4), (6, 2))])
def test_pooling_to_the_student_size_equals_adaptive_pooling(size, target):
    from kdfast.methods.kr import _pool_to
    f = torch.randn(2, 3, *size, dtype=torch.float64)
    torch.testing.assert_close(_pool_to(f, target), F.adaptive_avg_pool2d(f, target))


def _maps(seed=0, dtype=torch.float64):
    """Two groups: teacher maps (2 + 1 per group), aggregated and student maps of the student's shapes."""
    g = torch.Generator().manual_seed(seed)
    teacher = [[torch.randn(2, 6, 8, 8, generator=g, dtype=dtype) * 3, torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)],
               [torch.randn(2, 8, 4, 4, generator=g, dtype=dtype) * 0.5]]
    a = [torch.randn(2, 3, 4, 4, generator=g, dtype=dtype), torch.randn(2, 5, 2, 2, generator=g, dtype=dtype) * 2]
    s = [torch.randn(2, 3, 4, 4, generator=g, dtype=dtype), torch.randn(2, 5, 2, 2, generator=g, dtype=dtype)]
    return teacher, a, s


def _loss(teacher, a, s):
    return aggregation_loss(a, s, teacher_anchors(teacher, [x.shape[2:] for x in s]))


def test_teacher_anchors_are_the_teachers_energy_at_the_student_size():
    teacher, _, s = _maps()
    anchors = teacher_anchors(teacher, [(4, 4), (2, 2)])
    ref0 = (F.adaptive_avg_pool2d(teacher[0][0], 4).pow(2).mean() + F.adaptive_avg_pool2d(teacher[0][1], 4).pow(2).mean()) / 2
    torch.testing.assert_close(anchors[0], ref0)
    torch.testing.assert_close(anchors[1], F.adaptive_avg_pool2d(teacher[1][0], 2).pow(2).mean())
    assert all(not x.requires_grad for x in teacher_anchors([[t.requires_grad_() for t in teacher[1]]], [(2, 2)]))
    with pytest.raises(ValueError, match="group 0: the teacher's maps are all zero"):
        teacher_anchors([[torch.zeros(2, 3, 4, 4)]], [(4, 4)])
    with pytest.raises(ValueError, match="one group of teacher maps per student size"):
        teacher_anchors(teacher, [(4, 4)])


def test_aggregation_loss_formula():
    teacher, a, s = _maps()
    a = [x.requires_grad_() for x in a]
    anchors = teacher_anchors(teacher, [(4, 4), (2, 2)])
    loss = aggregation_loss(a, s, anchors)
    e = [x.double() for x in anchors]
    sigma = torch.stack([(x - y).std(correction=0) / ei.sqrt() for x, y, ei in zip(a, s, e)]).detach()
    w = sigma / sigma.sum()
    ref = sum(wi * F.mse_loss(x, y) / ei for wi, x, y, ei in zip(w, a, s, e))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    # the weights and the anchors are detached: d/da_0 = w_0 * 2 (a_0 - s_0) / (N E_0)
    torch.testing.assert_close(a[0].grad, w[0] * 2 * (a[0] - s[0]).detach() / (a[0].numel() * e[0]))
    assert float(aggregation_loss(s, s, anchors)) == 0.0


def test_aggregation_loss_means_the_same_at_every_feature_size():
    teacher, a, s = _maps()
    base = _loss(teacher, a, s)
    # every map (teacher's, aggregated, student's) scaled together: the same loss
    for c in (1e-3, 0.5, 7.0):
        torch.testing.assert_close(_loss([[c * t for t in g] for g in teacher], [c * x for x in a], [c * x for x in s]), base)
    # larger maps carrying the same content (each pixel repeated 2x2, each channel twice): the same loss
    same_size = [[F.adaptive_avg_pool2d(t, x.shape[2:]) for t in g] for g, x in zip(teacher, s)]
    up = lambda x: x.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat(1, 2, 1, 1)
    torch.testing.assert_close(_loss([[up(t) for t in g] for g in same_size], [up(x) for x in a], [up(x) for x in s]),
                               _loss(same_size, a, s))
    # more groups carrying the same errors: the same loss (the std weights are a convex combination)
    torch.testing.assert_close(_loss(teacher * 2, a * 2, s * 2), base)


def test_aggregation_loss_does_not_reward_shrinking_the_trained_maps_for_free():
    # The aggregated and the student maps are both trained; the teacher is frozen. Shrinking both by c
    # scales the loss by c^2 and its gradient by c, as a plain MSE: the loss is not invariant to the trained
    # maps' scale, and its gradient stays bounded as they shrink.
    teacher, a, s = _maps()
    base = _loss(teacher, a, s)
    grads = {}
    for c in (1.0, 0.1, 0.01):
        sc = [(c * x).requires_grad_() for x in s]
        loss = _loss(teacher, [c * x for x in a], sc)
        torch.testing.assert_close(loss, c ** 2 * base)
        loss.backward()
        grads[c] = torch.cat([g.grad.flatten() for g in sc]).norm()
    torch.testing.assert_close(grads[0.1], 0.1 * grads[1.0])
    torch.testing.assert_close(grads[0.01], 0.01 * grads[1.0])
    # a loss normalised by the trained maps' own energy (the form kdfast reverted) is blind to the
    # shrinking and its gradient grows as 1 / c: what let the tour's KR students collapse
    def self_normalised(x, y):
        return sum(F.mse_loss(p, q) / (p.detach().pow(2).mean() + q.detach().pow(2).mean()) for p, q in zip(x, y))
    norms = {}
    for c in (1.0, 0.01):
        sc = [(c * x).requires_grad_() for x in s]
        loss = self_normalised([c * x for x in a], sc)
        torch.testing.assert_close(loss, self_normalised(a, s))
        loss.backward()
        norms[c] = torch.cat([g.grad.flatten() for g in sc]).norm()
    torch.testing.assert_close(norms[0.01], 100 * norms[1.0])


def test_aggregation_loss_errors():
    teacher, a, s = _maps()
    anchors = teacher_anchors(teacher, [(4, 4), (2, 2)])
    with pytest.raises(ValueError, match="one anchor per group"):
        aggregation_loss(a, s, anchors[:1])
    with pytest.raises(ValueError, match="group 1: the anchor must be a positive scalar"):
        aggregation_loss(a, s, [anchors[0], torch.tensor(0.0)])
    with pytest.raises(ValueError, match="aggregated map has shape"):
        aggregation_loss([torch.randn(1, 2, 3, 3)], [torch.randn(1, 2, 2, 2)], [torch.tensor(1.0)])


def test_group_layers():
    assert group_layers(6, 2, 3) == [[0, 1, 2], [3, 4, 5]]
    assert group_layers(7, 3, None) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="do not form groups of k = 3"):
        group_layers(7, 2, 3)
    with pytest.raises(ValueError, match="cannot be split"):
        group_layers(2, 3, None)


def test_knowledge_aggregation_from_shapes_and_errors():
    ka = KnowledgeAggregation.from_shapes([(8, 8, 8)] * 3 + [(16, 4, 4)] * 3, [(4, 8, 8), (6, 4, 4)], k=3)
    feats = [torch.randn(2, 8, 8, 8)] * 3 + [torch.randn(2, 16, 4, 4)] * 3
    out = ka(feats)
    assert [o.shape for o in out] == [(2, 4, 8, 8), (2, 6, 4, 4)]
    assert ka(([feats[:3], feats[3:]]))[1].shape == (2, 6, 4, 4)
    with pytest.raises(ValueError, match="expected 6 teacher feature maps, got 5"):
        ka(feats[:5])
    with pytest.raises(ValueError, match=r"teacher feature 0 must be \(B, 8, H, W\)"):
        ka([torch.randn(2, 7, 8, 8)] + feats[1:])
    with pytest.raises(ValueError, match="one entry per student layer"):
        KnowledgeAggregation([[3]], [4, 5], [(2, 2)])
    torch.testing.assert_close(ka.loss(feats, out), torch.zeros(()))


# ------------------------------------------------------------------------------ models
class Teacher(nn.Module):
    def __init__(self):
        super().__init__()
        chans = [1, 8, 8, 8, 12, 12, 12]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i == 3 else 1, padding=1), nn.ReLU())
            for i in range(6)
        )
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.fc(x.mean((2, 3)))


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.b0 = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(5, 10)

    def forward(self, x):
        return self.fc(self.b1(self.b0(x)).mean((2, 3)))


T_LAYERS = [f"blocks.{i}" for i in range(6)]
S_LAYERS = ["b0", "b1"]


def test_capture_feature_shapes():
    shapes = capture_feature_shapes(Teacher(), T_LAYERS, torch.randn(1, 1, 8, 8))
    assert shapes == [(8, 8, 8)] * 3 + [(12, 4, 4)] * 3


def _data(n=24):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _distiller(**kw):
    torch.manual_seed(0)
    return KRDistiller(Teacher(), Student(), {"ce": nn.CrossEntropyLoss(), "kd": KDLoss(4.0, alpha=1.0)},
                       teacher_layers=T_LAYERS, student_layers=S_LAYERS, example_input=torch.randn(2, 1, 8, 8),
                       device="cpu", lr=0.05, aggregator_lr=0.1, batch_size=8, progress=False, **kw)


def test_kr_distiller_steps_update_own_parameters_only():
    d = _distiller(sparse_recoding=dict(boost=2.0, damp=0.5))
    teacher0 = [p.detach().clone() for p in d.teacher.parameters()]
    student0 = [p.detach().clone() for p in d.student.parameters()]
    agg0 = [p.detach().clone() for p in d.aggregation.parameters()]
    batch = next(iter(torch.utils.data.DataLoader(_data(), batch_size=8)))

    # Phase 1 alone (student fixed): only the aggregators move.
    out = d.compute_loss(batch)
    fit = d.aggregation.loss(out["teacher_features"], [f.detach() for f in out["student_features"]])
    d.optimizers["aggregator"].zero_grad()
    fit.backward()
    assert all(p.grad is None for p in d.student.parameters())
    d.optimizers["aggregator"].step()
    assert all(torch.equal(a, b) for a, b in zip(student0, d.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(agg0, d.aggregation.parameters()))

    # Full iterations: teacher frozen; student and aggregators both change.
    agg1 = [p.detach().clone() for p in d.aggregation.parameters()]
    history = d.fit(_data(), epochs=2)
    assert len(history) == 2 and {"loss/aggregation", "loss/aggregator_fit", "loss/ce", "loss/kd"} <= set(history[-1])
    assert all(torch.equal(a, b) for a, b in zip(teacher0, d.teacher.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(student0, d.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(agg1, d.aggregation.parameters()))
    # the student optimizer holds no aggregator parameter and vice versa
    s_ids = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    a_ids = {id(p) for g in d.optimizers["aggregator"].param_groups for p in g["params"]}
    assert not s_ids & a_ids and a_ids == {id(p) for p in d.aggregation.parameters()}
    d.close()


def test_kr_distiller_student_step_uses_recoded_gradients():
    # One iteration by hand (phase 1, phase 2 with SparseRecoding) equals training_step.
    d = _distiller(sparse_recoding=dict(boost=3.0, damp=0.25, shrink=0.001, tau_rate=0.1))
    ref = _distiller(sparse_recoding=dict(boost=3.0, damp=0.25, shrink=0.001, tau_rate=0.1))
    batch = next(iter(torch.utils.data.DataLoader(_data(), batch_size=8)))
    d.training_step(batch)

    out = ref.compute_loss(batch)
    anchors = ref.aggregation.anchors(out["teacher_features"])
    fit = aggregation_loss(ref.aggregation(out["teacher_features"]), [f.detach() for f in out["student_features"]],
                           anchors)
    ref.optimizers["aggregator"].zero_grad()
    fit.backward()
    ref.optimizers["aggregator"].step()
    with torch.no_grad():
        target = ref.aggregation(out["teacher_features"])
    loss = out["loss"] + ref.aggregation_weight * aggregation_loss(target, out["student_features"], anchors)
    ref.optimizer.zero_grad()
    loss.backward()
    ref.recoding.step()
    ref.optimizer.step()
    for a, b in zip(d.student.parameters(), ref.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(d.aggregation.parameters(), ref.aggregation.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    d.close()
    ref.close()


def test_kr_distiller_without_recoding_and_checkpoint(tmp_path):
    d = _distiller(sparse_recoding=False, checkpoint_dir=str(tmp_path), epochs=1)
    assert d.recoding is None
    d.fit(_data(16))
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert set(ckpt["auxiliaries"]) == {"aggregator"}
    assert set(ckpt["auxiliaries"]["aggregator"]) == {"module", "optimizer", "scheduler"}
    assert ckpt["sparse_recoding"] is None
    d.close()
    # resume into a fresh distiller with recoding: aggregation state restored
    e = _distiller(checkpoint_dir=str(tmp_path), resume=True, epochs=2)
    e.fit(_data(16))
    assert e.epoch == 2
    e.close()


def test_kr_distiller_errors():
    with pytest.raises(ValueError, match="example_input"):
        KRDistiller(Teacher(), Student(), {"ce": nn.CrossEntropyLoss()}, teacher_layers=T_LAYERS,
                    student_layers=S_LAYERS, device="cpu")
    with pytest.raises(ValueError, match="cannot cache teacher logits"):
        _distiller(cache_teacher_logits=True)
    with pytest.raises(ValueError, match="aggregation_weight must be"):
        _distiller(aggregation_weight=-1.0)
    with pytest.raises(ValueError, match="do not form groups of k = 3"):
        KRDistiller(Teacher(), Student(), {"ce": nn.CrossEntropyLoss()}, teacher_layers=T_LAYERS[:5],
                    student_layers=S_LAYERS, example_input=torch.randn(1, 1, 8, 8), device="cpu")


def test_kr_distiller_bf16_autocast():
    d = _distiller(amp="bf16", epochs=1)
    history = d.fit(_data(16))
    assert all(torch.isfinite(torch.tensor(v)) for k, v in history[-1].items() if k.startswith("loss"))
    assert all(p.dtype == torch.float32 for p in d.aggregation.parameters())
    d.close()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_kr_distiller_ddp_ranks_identical(tmp_path):
    # torchrun, 2 CPU processes (gloo): the student (DDP), the aggregators (their own DDP) and the
    # sparse-recoding thresholds end identical on both ranks.
    run_torchrun("kr_ddp_worker.py", tmp_path)
    r0, r1 = load_ranks_assert_identical(tmp_path, ("student", "aggregation"))
    assert torch.equal(r0["taus"], r1["taus"])
