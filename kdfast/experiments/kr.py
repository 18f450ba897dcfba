"""The KR experiment (Liu et al., CVPR-W 2019): does Knowledge Representing help a deliberately weak student?

A 6-block CNN teacher, a 2-block student of about 500 parameters; CE vs KD vs KR without recoding vs KR with
sparse recoding at several (boost, damp, shrink) settings, over seeds, with the paired difference to KD
(95 % confidence interval). The method itself: :mod:`kdfast.methods.kr`.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..methods.kr import PAPER, TITLE, build
from . import common

NAME = "kr"


def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallNet(nn.Module):
    """Conv-BN-ReLU blocks, global average pooling, linear classifier (the experiment's teacher and weak
    student). ``feature_layers`` lists the block outputs."""

    def __init__(self, channels, strides, num_classes=10, in_channels=1):
        super().__init__()
        chans = [in_channels, *channels]
        self.blocks = nn.Sequential(*[_block(chans[i], chans[i + 1], s) for i, s in enumerate(strides)])
        self.fc = nn.Linear(chans[-1], num_classes)
        self.feature_layers = [f"blocks.{i}" for i in range(len(channels))]

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))


def weak_student(in_channels=1, num_classes=10) -> SmallNet:
    """About 500 parameters: far below any teacher's capacity (where prior knowledge should matter most)."""
    return SmallNet([4, 8], [1, 2], num_classes, in_channels)


# SparseRecoding settings of the experiment (boost, damp, shrink); tau_rate 0.01 throughout.
RECODING_SETTINGS = [(2.0, 0.0, 0.0), (2.0, 0.5, 0.0), (2.0, 0.9, 0.0), (1.5, 0.5, 0.0), (1.5, 0.5, 1e-4),
                     (1.0, 0.5, 0.0)]


def _near_zero_share(model, rel=0.1) -> float:
    """Share of conv/linear weight entries with |w| < rel * mean |w| of their tensor."""
    small = total = 0
    for p in model.parameters():
        if p.dim() > 1:
            a = p.detach().abs()
            small += int((a < rel * a.mean()).sum())
            total += a.numel()
    return small / total


def _run_student(variant, teacher, train_set, test_set, epochs, seed, device, recoding=None):
    """One weak student trained with ``variant`` ("ce", "kd", "kr"); returns accuracy, curve, sparsity."""
    from ..distill import Distiller, evaluate
    from ..losses import KDLoss
    torch.manual_seed(1000 + seed)
    student = weak_student(train_set.in_channels, train_set.num_classes)
    engine = dict(device=device, lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine", epochs=epochs,
                  seed=seed, progress=False)
    if variant == "ce":
        d = Distiller(None, student, {"ce": nn.CrossEntropyLoss()}, **engine)
    elif variant == "kd":
        d = Distiller(teacher, student, {"kd": KDLoss(4.0, alpha=0.9)}, **engine)
    else:
        t_layers = list(teacher.feature_layers)
        d = build(teacher, student, teacher_layers=t_layers, student_layers=student.feature_layers,
                  k=len(t_layers) // 2 if len(t_layers) % 2 == 0 else None,  # None: near-equal groups
                  example_input=train_set.images[:2], sparse_recoding=recoding if recoding is not None else False,
                  **engine)
    train_eval = common.loader(train_set, 256, shuffle=False)
    curve = []
    engine_end = d.on_epoch_end

    def on_epoch_end(epoch, record):  # the student's train CE after each epoch
        engine_end(epoch, record)
        curve.append(evaluate(d.student, train_eval, device=device)["loss"])

    d.on_epoch_end = on_epoch_end
    with common.Timer() as timer:
        d.fit(common.loader(train_set, 64, seed=seed))
    acc = evaluate(d.student, common.loader(test_set, 256, shuffle=False), device=device)["accuracy"]
    d.close()
    return {"test_accuracy": acc, "train_ce_curve": curve, "near_zero_share": _near_zero_share(student),
            "seconds": timer.seconds}


def _compare(teacher, train_set, test_set, variants, epochs, seeds, device):
    results = {}
    for label, variant, recoding in variants:
        results[label] = [_run_student(variant, teacher, train_set, test_set, epochs, s, device, recoding)
                          for s in seeds]
    return results


def _table(results) -> list:
    lines = ["| student trained with | test accuracy (%) | vs KD (paired, points) | vs KD, 95 % CI (t) | final train CE | "
             "near-zero weights |",
             "|---|---|---|---|---|---|"]
    kd = [r["test_accuracy"] for r in results.get("KD", [])]
    for label, runs in results.items():
        accs = [r["test_accuracy"] for r in runs]
        diff = common.fmt_mean_std(common.paired_differences(accs, kd)) if kd and label != "KD" else "—"
        ci = common.fmt_ci(common.paired_summary(accs, kd)["ci95"]) if kd and label != "KD" else "—"
        ce = common.mean_std([r["train_ce_curve"][-1] for r in runs])[0]
        nz = common.mean_std([r["near_zero_share"] for r in runs])[0]
        lines.append(f"| {label} | {common.fmt_mean_std(accs)} | {diff} | {ci} | {ce:.4f} | {nz:.3f} |")
    return lines


def _plot(results, teacher_acc, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(results)
    for i, name in enumerate(names):
        curves = [r["train_ce_curve"] for r in results[name]]
        mean = [sum(c) / len(c) for c in zip(*curves)]
        ax1.plot(range(1, len(mean) + 1), mean, label=name, color=f"C{i}")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train cross-entropy of the student (mean of seeds)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    stats = [common.mean_std([100 * r["test_accuracy"] for r in results[n]]) for n in names]
    ax2.barh(range(len(names)), [m for m, _ in stats], xerr=[s for _, s in stats], color=[f"C{i}" for i in range(len(names))])
    ax2.set_yticks(range(len(names)), names, fontsize=7)
    ax2.axvline(100 * teacher_acc, color="k", ls="--", lw=1, label="teacher")
    ax2.set_xlim(max(0.0, min(m - s for m, s in stats) - 5), 100)
    ax2.set_xlabel("test accuracy (%), mean ± std over seeds")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: str, *, dataset: str = "digits", data_root=None, budget: str = "quick", seeds=None,
        device: str = "cpu") -> dict:
    """``kdfast experiment kr``: does KR help a deliberately weak student (about 500 parameters)?

    Teacher: a 6-block CNN (16-16-16-32-32-32 channels) trained once (digits: at 8x8; other datasets at
    their native size). Students: CE, KD (T = 4, alpha = 0.9), KR without recoding (KD + aggregation of
    teacher blocks 1-3 -> student block 1 and 4-6 -> block 2, k = 3), and KR with SparseRecoding at several
    (boost, damp, shrink) settings. "full": seeds 0, 1, 2, 20 epochs, six recoding settings; "quick":
    seeds 0, 1, 8 epochs, two settings (and on datasets other than digits a 10,000 / 2,000-image subset)."""
    seeds = common.check_run(dataset, budget, seeds, device)
    quick = budget == "quick"
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if seeds is None:
        seeds = [0, 1] if quick else [0, 1, 2]
    epochs = 8 if quick else 20
    settings = RECODING_SETTINGS[:2] if quick else RECODING_SETTINGS
    subsets = common.quick_subsets(dataset, budget)
    train_set, test_set = common.load_data(dataset, data_root, image_size=8 if dataset == "digits" else None,
                                           train_subset=subsets[0], test_subset=subsets[1])
    channels, classes = train_set.in_channels, train_set.num_classes
    size = train_set.image_size
    torch.manual_seed(0)
    teacher = SmallNet([16, 16, 16, 32, 32, 32], [1, 1, 1, 2, 1, 1], classes, channels)
    with common.Timer() as t_teacher:
        common.train_supervised(teacher, train_set, test_set, epochs=epochs, lr=0.05, seed=0, device=device)
    teacher.eval().requires_grad_(False)
    teacher_acc = common.accuracy(teacher, test_set, device)
    variants = [("CE", "ce", None), ("KD", "kd", None), ("KR, no recoding", "kr", None)]
    variants += [(f"KR boost={b:g} damp={d:g} shrink={s:g}", "kr", dict(boost=b, damp=d, shrink=s, tau_rate=0.01))
                 for b, d, s in settings]
    with common.Timer() as t_all:
        results = _compare(teacher, train_set, test_set, variants, epochs, seeds, device)
    os.makedirs(out_dir, exist_ok=True)
    student_params = sum(p.numel() for p in weak_student(channels, classes).parameters())
    _plot(results, teacher_acc, os.path.join(out_dir, "kr.png"),
          f"KR on {dataset} {size}x{size}: weak student ({student_params} parameters)")
    lines = [
        f"# Knowledge Representing on {dataset} ({size}x{size}), weak student",
        "",
        f"*{PAPER}*. No public code exists and the paper's equations are not available: kdfast's KR is an "
        "interpretation of the paper's text (see `kdfast.methods.kr`).",
        "",
        f"Teacher: 6-block CNN, {sum(p.numel() for p in teacher.parameters())} parameters, test accuracy "
        f"{100 * teacher_acc:.2f}% ({t_teacher.seconds:.0f} s). Student: 2-block CNN, "
        f"{student_params} parameters. {epochs} epochs, SGD lr 0.05 cosine, "
        f"batch 64, seeds {seeds}. Near-zero: share of student weights with |w| < 0.1 mean |w| of their tensor. "
        f"Data: {len(train_set)} training / {len(test_set)} test images.",
        "",
        *_table(results),
        "",
        "![curves and accuracies](kr.png)",
        "",
        f"Run time {t_all.seconds:.0f} s for the students{' (quick budget)' if quick else ''}. Whether KR beats KD "
        "is what the table measures; the paired columns are KR minus KD with the same seed.",
        "",
    ]
    results_out = {"teacher_accuracy": teacher_acc, "epochs": epochs, "seeds": seeds, "runs": results,
                   "data": common.data_info(train_set, test_set, dataset, data_root), "time_s": t_all.seconds,
                   "run": common.run_record(NAME, out_dir, dataset=dataset, data_root=data_root, budget=budget,
                                            seeds=seeds, device=device)}
    common.write_report(out_dir, "\n".join(lines), results_out)
    return results_out


def demo_section(ctx: common.DemoContext) -> common.DemoSection:
    """CE vs KD vs KR (with the default sparse recoding) for the weak student, from the tour's teacher."""
    epochs = 1 if ctx.tiny else 6
    variants = [("CE", "ce", None), ("KD", "kd", None), ("KR", "kr", {})]
    with common.Timer() as timer:
        results = _compare(ctx.teacher, ctx.train_set, ctx.test_set, variants, epochs, ctx.seeds, ctx.device)
    _plot(results, common.accuracy(ctx.teacher, ctx.test_set, ctx.device), os.path.join(ctx.out_dir, "kr.png"),
          "KR: weak student from the tour's teacher")
    lines = [
        f"The tour's teacher ({ctx.teacher_name}) distilled into a weak 2-block student "
        f"({sum(p.numel() for p in weak_student().parameters())} parameters), {epochs} epochs per run, seeds "
        f"{ctx.seeds}: CE only, Hinton KD, and KR (KD + knowledge aggregation of the teacher's stage outputs into "
        "the student's two blocks + sparse recoding of the student's gradients with the default setting). "
        "KR is kdfast's interpretation of the paper's text (no public code, equations not available).",
        "",
        *_table(results),
        "",
        "![KR](kr.png)",
        "",
        f"Section time {timer.seconds:.0f} s. `kdfast experiment kr --budget full` runs the full comparison (3 seeds, "
        "20 epochs, six recoding settings, a teacher of its own).",
    ]
    return common.DemoSection(name=NAME, title=TITLE, markdown="\n".join(lines), results={"runs": results},
                              figures=["kr.png"], time_s=timer.seconds)
