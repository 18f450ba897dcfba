"""The BSS experiment (Heo, Lee, Yun, Choi, AAAI 2019): CE vs KD vs BSS with limited training data.

Quick budget and the tour: a vgg8 teacher trained with cross-entropy, a vgg8 student at half its width (a
quarter of its parameters) trained by each method on class-stratified fractions of the training set, over
seeds; paired (same seed and subset) differences with 95 % confidence intervals; the cost of a BSS step
against a KD step; and a picture of boundary-supporting samples.

Full budget (:class:`ReproductionConfig`, :func:`reproduce`): the reproduction protocol of the paper's two
claims (BSS beats KD; more so with less data): the reference ResNet-26 teacher, a ResNet-8 student, a KD
baseline tuned on a validation split, 1/5/20/100 % of the data x 3 seeds, test curves and the convergence
check, verdicts per claim, resumable runs. The method itself: :mod:`kdfast.methods.bss`.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distill import Distiller
from ..methods.bss import PAPER, TITLE, BSSDistiller, bss_attack, bss_weights, kd_baseline, sample_target_classes
from . import common, protocol

NAME = "bss"

METHODS = {"ce": "CE", "kd": "KD", "bss": "BSS"}


@dataclass
class ExperimentConfig:
    """Digits experiment: teacher -> smaller student, CE vs KD vs BSS, over seeds and data fractions."""

    seeds: tuple = (0, 1, 2)
    fractions: tuple = (0.1, 0.25, 0.5, 1.0)
    teacher_epochs: int = 12
    teacher_width: float = 0.25
    student_width: float = 0.125       # vgg8 at half the teacher's width: 0.25x its parameters
    steps: int = 330                   # optimizer steps per student run (15 epochs of the full set)
    batch_size: int = 64
    max_samples: int = 16              # the official 64 of a batch of 256, scaled to the batch
    lr: float = 0.1
    weight_decay: float = 1e-4
    cost_rounds: int = 10
    grid_samples: int = 6
    tiny: bool = False
    # BSS's weight is zero from 3/4 of the epochs on (the official schedule): a 1-epoch run has no BSS term,
    # so a run gets at least this many epochs (digits subsets take several epochs anyway)
    min_epochs: int = 1

    @classmethod
    def quick(cls) -> "ExperimentConfig":
        return cls(seeds=(0, 1), fractions=(0.1, 1.0), teacher_epochs=8, steps=120, cost_rounds=5)

    @classmethod
    def tiny_config(cls) -> "ExperimentConfig":
        return cls(seeds=(0,), fractions=(0.5,), teacher_epochs=1, teacher_width=0.125, student_width=0.0625,
                   steps=3, cost_rounds=1, grid_samples=2, tiny=True)


def _clamp_range(dataset) -> Tuple[float, float]:
    """The normalised range of [0, 1] pixels: the attack's clamp (the official (-2.5, 2.5) is CIFAR's).
    Several channels: the widest range over them (the attack clamps every channel alike)."""
    lo = min((0.0 - m) / s for m, s in zip(dataset.mean, dataset.std))
    hi = max((1.0 - m) / s for m, s in zip(dataset.mean, dataset.std))
    return lo, hi


def _engine_kwargs(cfg: ExperimentConfig, epochs: int, seed: int, device) -> dict:
    return dict(epochs=epochs, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, schedule="step",
                milestones=sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)}), gamma=0.1, seed=seed,
                device=device, progress=False)


def _make_engine(method: str, teacher, student, cfg: ExperimentConfig, epochs: int, seed: int, device, clamp):
    engine = _engine_kwargs(cfg, epochs, seed, device)
    if method == "ce":
        return Distiller(None, student, {"ce": nn.CrossEntropyLoss()}, **engine)
    if method == "kd":
        return kd_baseline(teacher, student, **engine)
    return BSSDistiller(teacher, student, max_samples=cfg.max_samples, clamp=clamp, **engine)


def _student(model_kwargs: dict, width: float, seed: int) -> nn.Module:
    from .. import models
    from ..distill import seed_everything

    seed_everything(seed)
    return models.build("vgg8", **{**model_kwargs, "width_mult": width})


def _run(method, teacher, model_kwargs, train, test, cfg, fraction, seed, device, clamp) -> dict:
    subset = common.fraction_subset(train, fraction, seed=seed)
    per_epoch = math.ceil(len(subset) / cfg.batch_size)
    epochs = max(cfg.min_epochs, math.ceil(cfg.steps / per_epoch))
    student = _student(model_kwargs, cfg.student_width, seed)
    engine = _make_engine(method, teacher, student, cfg, epochs, seed, device, clamp)
    with common.Timer() as timer:
        try:
            engine.fit(common.loader(subset, cfg.batch_size, seed=seed))
            stats = dict(getattr(engine, "bss_epoch_stats", {}))
        finally:
            engine.close()
    acc = common.accuracy(student, test, device=device)
    return {"method": method, "fraction": fraction, "seed": seed, "train_images": len(subset), "epochs": epochs,
            "steps": epochs * per_epoch, "accuracy": acc, "time_s": timer.seconds, "last_epoch_bss": stats}


def measure_step_cost(teacher, model_kwargs, train, cfg, device, clamp, seed: int = 0, make_student=None) -> dict:
    """Median time of one KD step and one BSS step (same student, teacher and batch), timed in turns.
    ``make_student(seed)`` builds the student (default: the digits experiment's vgg8 at ``cfg.student_width``)."""
    import statistics
    import time

    if make_student is None:
        make_student = lambda s: _student(model_kwargs, cfg.student_width, s)  # noqa: E731
    batch = (train.images[: cfg.batch_size], train.labels[: cfg.batch_size])
    engines = {"kd": kd_baseline(teacher, make_student(seed), **_engine_kwargs(cfg, 100, seed, device)),
               "bss": BSSDistiller(teacher, make_student(seed), max_samples=cfg.max_samples,
                                   clamp=clamp, **_engine_kwargs(cfg, 100, seed, device))}
    times: dict = {k: [] for k in engines}
    try:
        for e in engines.values():
            e.on_epoch_start(0)
            e.training_step(batch)  # warm-up
        for r in range(max(1, cfg.cost_rounds)):
            for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                if device != "cpu" and torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                engines[name].training_step(batch)
                if device != "cpu" and torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        bss_stats = dict(engines["bss"].bss_epoch_stats)
    finally:
        for e in engines.values():
            e.close()
    ratios = sorted(b / k for b, k in zip(times["bss"], times["kd"]))
    return {"kd_ms": 1e3 * statistics.median(times["kd"]), "bss_ms": 1e3 * statistics.median(times["bss"]),
            "ratio": statistics.median(ratios), "rounds": len(ratios), "batch_size": cfg.batch_size,
            "attacked_per_step": bss_stats["attacked"] / max(1, bss_stats["bss_steps"]),
            "teacher_calls_per_attack": bss_stats["teacher_calls"] / max(1, bss_stats["bss_steps"])}


def boundary_grid(teacher, dataset, path: str, n: int = 6, seed: int = 0, clamp=(-2.5, 2.5), device="cpu") -> dict:
    """Picture: ``n`` base samples (teacher-correct test images), their boundary-supporting samples and
    the difference, each titled with the teacher's probabilities of the base and the target class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[: 4 * n]
    x, y = dataset.images[idx].to(device), dataset.labels[idx].to(device)
    with torch.no_grad():
        t = teacher(x)
    keep = (t.argmax(1) == y).nonzero().squeeze(1)[:n]
    x, y, t = x[keep], y[keep], t[keep]
    if x.shape[0] == 0:  # an untrained teacher (tiny runs) may classify none of the candidates correctly
        fig, ax = plt.subplots(figsize=(6.0, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no base sample: the teacher classified none of {len(idx)} test images correctly",
                ha="center", va="center", fontsize=9)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return {"samples": [], "teacher_calls": 0, "moving": []}
    k = sample_target_classes(t, torch.Generator(device=x.device).manual_seed(seed))
    stats: dict = {}
    x_adv = bss_attack(teacher, x, k, clamp=clamp, stats=stats)
    with torch.no_grad():
        p, p_adv = F.softmax(teacher(x), 1), F.softmax(teacher(x_adv), 1)
    rows = []
    fig, axes = plt.subplots(x.shape[0], 3, figsize=(6.0, 2.0 * x.shape[0]), squeeze=False)
    for i in range(x.shape[0]):
        b, kk = int(y[i]), int(k[i])
        rows.append({"base": b, "target": kk, "p_before": [float(p[i, b]), float(p[i, kk])],
                     "p_after": [float(p_adv[i, b]), float(p_adv[i, kk])], "pred_after": int(p_adv[i].argmax()),
                     "l2": float((x_adv[i] - x[i]).norm())})
        diff = (x_adv[i] - x[i])[0].cpu()
        lim = float(diff.abs().max()) or 1.0
        for j, (img, title, cmap, kw) in enumerate((
                (x[i, 0].cpu(), f"base: p({b})={p[i, b]:.2f}\np({kk})={p[i, kk]:.2f}", "gray", {}),
                (x_adv[i, 0].cpu(), f"BSS: p({b})={p_adv[i, b]:.2f}\np({kk})={p_adv[i, kk]:.2f}", "gray", {}),
                (diff, f"difference (L2 {rows[-1]['l2']:.2f})", "seismic", {"vmin": -lim, "vmax": lim}))):
            ax = axes[i, j]
            ax.imshow(img, cmap=cmap, **kw)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.suptitle("Base samples and their boundary-supporting samples (teacher's class probabilities)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"samples": rows, "teacher_calls": len(stats["moving"]), "moving": stats["moving"]}


def _plot_fractions(summary: dict, path: str, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, label in METHODS.items():
        fr = sorted(summary[method])
        means = [100 * summary[method][f]["mean"] for f in fr]
        stds = [100 * summary[method][f]["std"] for f in fr]
        ax.errorbar([100 * f for f in fr], means, yerr=stds, fmt="-o", ms=4, capsize=3, color=common.colour(method),
                    label=label)
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in sorted(next(iter(summary.values())))])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(f"training data used (% of the {data['train']:,} {data.get('name', 'digits')} images)")
    ax.set_ylabel("student test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("vgg8 student from a vgg8 teacher: mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _experiment(cfg: ExperimentConfig, out_dir: str, device, teacher=None, model_kwargs=None, train=None,
                test=None, dataset: str = "digits", teacher_acc=None, teacher_s: float = 0.0) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device(device)
    with common.Timer() as total:
        if train is None:
            train, test = common.digits(train_subset=192 if cfg.tiny else None, test_subset=96 if cfg.tiny else None)
        if teacher is None:
            with common.Timer() as tt:
                teacher, model_kwargs, _ = common.train_teacher(train, test, epochs=cfg.teacher_epochs,
                                                              width=cfg.teacher_width, seed=0, device=device)
            teacher_s = tt.seconds
        teacher = teacher.to(device).eval().requires_grad_(False)
        if teacher_acc is None:
            teacher_acc = common.accuracy(teacher, test, device=device)
        clamp = _clamp_range(train)
        runs = []
        for fraction in cfg.fractions:
            for seed in cfg.seeds:
                for method in METHODS:
                    runs.append(_run(method, teacher, model_kwargs, train, test, cfg, fraction, seed, device, clamp))
                    r = runs[-1]
                    print(f"bss experiment: {METHODS[method]:>3} {100 * fraction:5.1f}% data seed {seed}: "
                          f"{100 * r['accuracy']:.2f}% ({r['steps']} steps, {r['time_s']:.1f} s)", flush=True)
        summary = {m: {} for m in METHODS}
        paired = {m: {} for m in METHODS if m != "ce"}
        for method in METHODS:
            for fraction in cfg.fractions:
                accs = [r["accuracy"] for r in runs if r["method"] == method and r["fraction"] == fraction]
                m, s = common.mean_std(accs)
                summary[method][fraction] = {"mean": m, "std": s, "runs": accs}
        for fraction in cfg.fractions:
            by = {m: [r["accuracy"] for r in runs if r["method"] == m and r["fraction"] == fraction] for m in METHODS}
            for other in ("ce", "kd"):
                paired["bss"][f"{other}@{fraction}"] = common.paired_summary(by["bss"], by[other])
            paired["kd"][f"ce@{fraction}"] = common.paired_summary(by["kd"], by["ce"])
        cost = measure_step_cost(teacher, model_kwargs, train, cfg, device.type, clamp)
        grid = boundary_grid(teacher, test, os.path.join(out_dir, "bss_samples.png"), n=cfg.grid_samples, clamp=clamp,
                             device=device)
        data = {"name": dataset, "train": len(train), "test": len(test), "clamp": list(clamp)}
        _plot_fractions(summary, os.path.join(out_dir, "accuracy_vs_data.png"), data)
    results = {"config": asdict(cfg), "teacher": {"model": "vgg8", "width": cfg.teacher_width,
                                                  "test_accuracy": teacher_acc, "train_s": teacher_s},
               "student": {"model": "vgg8", "width": cfg.student_width,
                           "parameters": sum(p.numel() for p in _student(model_kwargs, cfg.student_width, 0).parameters()),
                           "teacher_parameters": sum(p.numel() for p in teacher.parameters())},
               "data": data,
               "runs": runs, "summary": {m: {str(f): v for f, v in s.items()} for m, s in summary.items()},
               "paired": paired, "step_cost": cost, "grid": grid, "time_s": total.seconds,
               "threads": torch.get_num_threads()}
    return results


def _verdict(results: dict) -> str:
    """One honest sentence per data fraction: does BSS beat KD beyond the paired spread?"""
    out = []
    for key, v in results["paired"]["bss"].items():
        other, fraction = key.split("@")
        if other != "kd":
            continue
        m, s, n = 100 * v["mean"], 100 * v["std"], len(v["diffs"])
        wins = sum(d > 0 for d in v["diffs"])
        lo, hi = v.get("ci95") or common.confidence_interval(v["diffs"])
        excludes_zero = n >= 2 and lo is not None and hi is not None and (lo > 0 or hi < 0)
        if excludes_zero and abs(m) >= 100 / results["data"]["test"]:
            word = "better than" if m > 0 else "worse than"
        else:
            word = "not distinguishable from"
        out.append(f"{100 * float(fraction):g}% of the data: BSS {word} KD ({m:+.2f} ± {s:.2f} points, "
                   f"better in {wins} of {n} seeds)")
    return "; ".join(out)


def render_report(results: dict, heading: str = "#") -> str:
    cfg = results["config"]
    fr = [float(f) for f in results["summary"]["ce"]]
    c = results["step_cost"]
    lines = [f"{heading} BSS on {results['data'].get('name', 'digits')}: CE vs KD vs BSS with limited training data", "",
             f"Teacher vgg8 (width {cfg['teacher_width']:g}, {results['teacher']['test_accuracy'] * 100:.2f}% test "
             f"accuracy) -> student vgg8 (width {cfg['student_width']:g}, {results['student']['parameters']:,} "
             f"parameters, {results['student']['parameters'] / results['student']['teacher_parameters']:.2f}x the "
             f"teacher's). Every student run: {cfg['steps']} SGD steps of batch {cfg['batch_size']}"
             + (f" and at least {cfg['min_epochs']} epochs" if cfg.get("min_epochs", 1) > 1 else "") + " (more epochs on "
             f"smaller subsets), lr {cfg['lr']:g} x0.1 at 1/2 and 3/4 of the epochs, momentum 0.9, wd "
             f"{cfg['weight_decay']:g}; seeds {list(cfg['seeds'])} (the seed also draws the class-stratified subset, "
             "shared by the three methods). CE: labels only. KD: the official script without the BSS term "
             "(CE + (3(1 - e/E) + 1) x soft-CE at T = 3). BSS: KD + max(2(1 - 4e/3E), 0) x soft-CE at T = 3 on the "
             f"boundary-supporting samples of up to {cfg['max_samples']} base samples per batch (the official 64 of "
             f"256, scaled), 10 attack steps of 0.3, clamp to the data's pixel range {tuple(round(v, 2) for v in results['data']['clamp'])}.",
             "", f"{heading}# Student test accuracy (%), mean ± std over seeds", "",
             "| method | " + " | ".join(f"{100 * f:g}% data" for f in fr) + " |", "|---" * (1 + len(fr)) + "|"]
    for method, label in METHODS.items():
        cells = [common.fmt_mean_std(results["summary"][method][str(f)]["runs"]) for f in fr]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"{heading}# Paired differences (same seed and subset), points: mean ± std [95 % confidence interval, t]", "",
              "| comparison | " + " | ".join(f"{100 * f:g}% data" for f in fr) + " |", "|---" * (1 + len(fr)) + "|"]
    for key, label in (("bss", "kd"), ("bss", "ce"), ("kd", "ce")):
        cells = [common.fmt_mean_std(results["paired"][key][f"{label}@{f}"]["diffs"]) + " "
                 + common.fmt_ci(results["paired"][key][f"{label}@{f}"].get("ci95", (None, None))) for f in fr]
        lines.append(f"| {METHODS[key]} - {METHODS[label]} | " + " | ".join(cells) + " |")
    lines += ["", f"**Does BSS help here?** {_verdict(results)}. (One test image is "
              f"{100 / results['data']['test']:.2f} points; a difference counts only if its 95 % confidence interval "
              "excludes zero and its mean exceeds one image.)", "",
              f"{heading}# Cost", "",
              f"One training step (batch {c['batch_size']}, {c['rounds']} rounds timed in turns): KD {c['kd_ms']:.1f} ms, "
              f"BSS {c['bss_ms']:.1f} ms, **BSS / KD = {c['ratio']:.2f}x** (median of per-round ratios; "
              f"{c['attacked_per_step']:.0f} attacked samples and {c['teacher_calls_per_attack']:.1f} teacher forward + "
              f"backward passes per attack). {results['threads']} CPU threads; the machine may have been shared.",
              "", f"{heading}# Boundary-supporting samples", "",
              "`bss_samples.png`: test images the teacher classifies correctly (left), the attack's result (middle: "
              "moved toward the boundary with a target class drawn from the teacher's other probabilities) and the "
              "difference (right), with the teacher's probabilities of the base and the target class.", "",
              "| base | target | p(base), p(target) before | after | teacher predicts after | L2 of the move |",
              "|---:|---:|---|---|---:|---:|"]
    for r in results["grid"]["samples"]:
        lines.append(f"| {r['base']} | {r['target']} | {r['p_before'][0]:.3f}, {r['p_before'][1]:.3f} | "
                     f"{r['p_after'][0]:.3f}, {r['p_after'][1]:.3f} | {r['pred_after']} | {r['l2']:.2f} |")
    lines += ["", f"Still-moving samples at each of the attack's teacher calls: {results['grid']['moving']}.", "",
              f"Files: `accuracy_vs_data.png` (accuracy vs data fraction per method), `bss_samples.png`, "
              f"`results.json`. Run time {results['time_s']:.0f} s.", ""]
    return "\n".join(lines)


def run(out_dir: str, *, dataset: str = "digits", data_root=None, budget: str = "quick", seeds=None,
        device: str = "cpu") -> dict:
    """``kdfast experiment bss``: CE vs KD vs BSS on ``dataset``.

    "full": the reproduction protocol (:class:`ReproductionConfig`, :func:`reproduce`): the reference
    ResNet-26 teacher, a ResNet-8 student, a KD baseline tuned on a validation split, 1/5/20/100 % of the
    training part x seeds 0, 1, 2, per-run test curves, verdicts per claim; a killed run re-run with the same
    command continues (``<out>/runs``, ``<out>/checkpoints``). About 60 min on 2 idle CPU cores on
    Fashion-MNIST (the estimate at the top of this section), the teacher's training (about 25 min, once)
    apart. Writes report.md, results.json, accuracy_vs_data.png, training_curves.png, bss_samples.png.

    "quick": the vgg8 pair of the tour, seeds 0, 1, fractions 10 and 100 %, short runs (on datasets other
    than digits a fixed 10,000-image training / 2,000-image test subset); minutes. Its teacher is cached
    (:func:`kdfast.experiments.common.cached_teacher`). Writes report.md, results.json,
    accuracy_vs_data.png, bss_samples.png."""
    seeds = common.check_run(dataset, budget, seeds, device)
    if budget == "full":
        return _run_full(out_dir, dataset=dataset, data_root=data_root, seeds=seeds, device=device)
    quick = budget == "quick"
    cfg = ExperimentConfig.quick() if quick else ExperimentConfig()
    cfg.min_epochs = 4  # at least 2 epochs with a BSS term (digits subsets need more epochs than that anyway)
    if seeds is not None:
        cfg.seeds = tuple(seeds)
    subsets = common.quick_subsets(dataset, budget)
    train, test = common.load_data(dataset, data_root, train_subset=subsets[0], test_subset=subsets[1])
    teacher, model_kwargs, teacher_acc, cache = common.cached_teacher(
        dataset, train, test, name="vgg8", width=cfg.teacher_width, epochs=cfg.teacher_epochs, seed=0, device=device)
    results = _experiment(cfg, out_dir, device, teacher=teacher, model_kwargs=model_kwargs, train=train, test=test,
                          dataset=dataset, teacher_acc=teacher_acc, teacher_s=cache["train_s"])
    results["teacher"]["cache"] = cache
    results["quick"] = quick
    results["run"] = common.run_record(NAME, out_dir, dataset=dataset, data_root=data_root, budget=budget,
                                       seeds=list(cfg.seeds), device=device)
    common.write_report(out_dir, render_report(results), results)
    return results


def _run_full(out_dir: str, *, dataset: str, data_root, seeds, device: str, cfg: ReproductionConfig = None) -> dict:
    cfg = cfg or ReproductionConfig()
    if seeds is not None:
        cfg.seeds = tuple(seeds)
    if len(cfg.seeds) < 2:
        raise ValueError(f"the full protocol pairs runs by seed and needs at least 2 seeds, got {list(cfg.seeds)}")
    train, test = common.load_data(dataset, data_root)
    results = reproduce(cfg, out_dir, device, dataset=dataset, train=train, test=test)
    results["run"] = common.run_record(NAME, out_dir, dataset=dataset, data_root=data_root, budget="full",
                                       seeds=list(cfg.seeds), device=device)
    common.write_report(out_dir, render_reproduction(results), results)
    return results


def demo_section(ctx: common.DemoContext) -> common.DemoSection:
    """The tour's BSS section: the tour's teacher, a half-width student, CE vs KD vs BSS on 25% of the
    training data over the tour's seeds (``ctx.tiny``: a seconds-long configuration)."""
    width = ctx.model_kwargs.get("width_mult", 0.25)
    if ctx.tiny:
        cfg = ExperimentConfig.tiny_config()
        cfg.seeds = tuple(ctx.seeds[:1])
    else:
        cfg = ExperimentConfig(seeds=tuple(ctx.seeds), fractions=(0.25,), steps=60, cost_rounds=3, grid_samples=4)
    cfg.teacher_width, cfg.student_width = width, width / 2
    kwargs = {k: v for k, v in ctx.model_kwargs.items() if k != "width_mult"}
    with common.Timer() as timer:
        results = _experiment(cfg, ctx.out_dir, ctx.device, teacher=ctx.teacher, model_kwargs=kwargs,
                              train=ctx.train_set, test=ctx.test_set)
    results["budget_s"] = ctx.budget_s
    return common.DemoSection(name=NAME, title=TITLE, markdown=render_report(results, heading="###").split("\n", 2)[2],
                              results=results, figures=["accuracy_vs_data.png", "bss_samples.png"], time_s=timer.seconds)


# ============================================================================================ the reproduction
# ``--budget full``: the protocol of issue 20 (the claims of Heo et al., AAAI 2019, on Fashion-MNIST).
#
# Wall time. The first full run (epochs 30, 12, 4, 3 at 1, 5, 20, 100 %) took 39.8 min on 2 idle cores of an
# Intel Xeon: student runs 4.4, 4.9, 5.6 and 22.2 min per fraction (CE, KD and BSS, 3 seeds), KD tuning 2.6,
# the rest under a minute. A BSS epoch costs about 3 KD epochs while its weight is positive (10 attack steps
# on the ResNet-26 teacher for up to 32 samples a batch) and about one once it is 0. Its 3- and 4-epoch
# cells could not converge by protocol.convergence: the point at or before 80 % of the schedule came
# before the last LR drop (3E/4), so the window held the drop. The epochs below put that point after the
# drop at every fraction (E = 5: the 4th of 5 epochs; 10: the 8th; 20: the 16th, with a curve point every
# 2 epochs). Measured with them: 55.9 min (1 %: 4.0, 5 %: 5.8, 20 %: 7.8, 100 %: 35.4, KD tuning 2.6). At 1 %
# the 10 test evaluations of a run (about 1.5 s each) cost more than its 100 steps. The teacher, trained
# once and cached, about 22-25 min more, reported apart.

FULL_METHODS = METHODS  # ce, kd, bss


@dataclass
class ReproductionConfig:
    """The protocol of ``--budget full``: CE vs KD vs BSS at data fractions, each with its own epochs.

    The teacher is :func:`protocol.reference_teacher` (``teacher`` overrides its recipe), trained on the
    training part of :func:`protocol.validation_split`; the KD baseline's temperature and weight are chosen
    on the validation part (a grid at ``tune_fraction`` of the training part, first seed), and BSS's clean
    KD term uses the same (its boundary term keeps the official weight schedule, at the same T as the
    official code). Every method at a fraction gets the same epochs, optimiser, batches and (no) augmentation.
    """

    seeds: tuple = (0, 1, 2)
    fractions: tuple = (0.01, 0.05, 0.2, 1.0)
    epochs: tuple = (20, 10, 5, 5)          # per fraction (smaller subsets: more epochs, fewer steps in all)
    teacher: dict = field(default_factory=dict)   # overrides of protocol.REFERENCE_TEACHER
    student: str = "resnet8"
    student_width: float = 1.0
    batch_size: int = 128
    max_samples: int = 32                   # the official 64 base samples of a batch of 256, scaled to 128
    lr: float = 0.1
    weight_decay: float = 1e-4
    validation_fraction: float = 0.1
    kd_temperatures: tuple = (2.0, 3.0, 5.0)
    kd_scales: tuple = (0.5, 1.0, 2.0)      # factors on the official KD weight 3 (1 - e/E) + 1
    tune_fraction: float = 0.05
    curve_points: int = 10                  # test evaluations per run (evenly spaced, the last at the end)
    cost_rounds: int = 10

    def __post_init__(self):
        if len(self.epochs) != len(self.fractions):
            raise ValueError(f"epochs must give one number per fraction ({len(self.fractions)}), got {self.epochs!r}")
        for f in self.fractions:
            if not 0 < f <= 1:
                raise ValueError(f"fractions must lie in (0, 1], got {f!r}")
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 2 for e in self.epochs):
            # BSS's weight is zero from 3/4 of the epochs on: one epoch would have no BSS term at all
            raise ValueError(f"epochs must be ints >= 2 (BSS's term is off in the last quarter), got {self.epochs!r}")
        if self.tune_fraction not in self.fractions:
            raise ValueError(f"tune_fraction must be one of the fractions {self.fractions}, got {self.tune_fraction!r}")
        if not self.kd_temperatures or not self.kd_scales:
            raise ValueError("kd_temperatures and kd_scales must each hold at least one value")

    @classmethod
    def tiny(cls) -> "ReproductionConfig":
        """Seconds on digits: the whole protocol, for tests."""
        return cls(seeds=(0, 1), fractions=(0.5, 1.0), epochs=(2, 2), student="vgg8", student_width=0.0625,
                   teacher={"name": "vgg8", "width": 0.125, "epochs": 1}, batch_size=64, max_samples=8,
                   kd_temperatures=(3.0,), kd_scales=(0.5, 1.0), tune_fraction=0.5, curve_points=2, cost_rounds=1)

    def epochs_at(self, fraction: float) -> int:
        return self.epochs[self.fractions.index(fraction)]

    def grid(self) -> list:
        return [{"temperature": t, "kd_scale": s} for t in self.kd_temperatures for s in self.kd_scales]


def evaluation_every(epochs: int, points: int) -> int:
    """The smallest number of epochs between test evaluations that divides ``epochs`` and gives at most
    ``points`` evaluations (evenly spaced, the last at the end of the schedule: what
    :func:`protocol.convergence` reads)."""
    return min(d for d in range(1, epochs + 1) if epochs % d == 0 and epochs // d <= max(1, points))


def _protocol_engine(method: str, teacher, student, cfg: ReproductionConfig, epochs: int, seed: int, device, clamp,
                     setting: dict, checkpoint_dir: str):
    """CE, the tuned KD baseline or BSS (its KD term tuned like the baseline's), checkpointing every epoch to
    ``checkpoint_dir`` and resuming from it. KD and BSS reuse the teacher's clean logits after the first epoch:
    the data pipeline is deterministic (no augmentation) and the teacher frozen in eval mode, so the cached
    logits are the ones a fresh forward pass would give."""
    engine = dict(_engine_kwargs(cfg, epochs, seed, device), checkpoint_dir=checkpoint_dir,
                  resume=checkpoint_dir is not None)
    if method == "ce":
        made = Distiller(None, student, {"ce": nn.CrossEntropyLoss()}, **engine)
    elif method == "kd":
        made = kd_baseline(teacher, student, temperature=setting["temperature"], kd_scale=setting["kd_scale"],
                           cache_teacher_logits=True, **engine)
    elif method == "bss":
        made = BSSDistiller(teacher, student, temperature=setting["temperature"], kd_scale=setting["kd_scale"],
                            max_samples=cfg.max_samples, clamp=clamp, cache_teacher_logits=True, **engine)
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    # the loss classes alone do not show T or the KD weight: a resumed checkpoint must have used the same
    made.record_config("bss_experiment", {"method": method, **({} if method == "ce" else setting)})
    return made


def _build_student(cfg: ReproductionConfig, model_kwargs: dict, seed: int) -> nn.Module:
    from .. import models
    from ..distill import seed_everything

    seed_everything(seed)
    return models.build(cfg.student, **{**model_kwargs, "width_mult": cfg.student_width})


def _train_run(method: str, setting: dict, teacher, model_kwargs: dict, subset, eval_set, cfg: ReproductionConfig,
               epochs: int, seed: int, device, clamp, checkpoint_dir: str, points: int) -> dict:
    """One student run: train, evaluating on ``eval_set`` every few epochs (the values live in the engine's
    epoch records, so they come back with a resumed checkpoint), and return its record."""
    from ..distill import IndexedDataset

    student = _build_student(cfg, model_kwargs, seed)
    engine = _protocol_engine(method, teacher, student, cfg, epochs, seed, device, clamp, setting, checkpoint_dir)
    every = evaluation_every(epochs, points)

    def on_epoch_end(epoch, record, _base=engine.on_epoch_end):
        _base(epoch, record)
        if hasattr(engine, "bss_epoch_stats"):
            record["bss"] = dict(engine.bss_epoch_stats)
        if (epoch + 1) % every == 0:
            record["eval_set_accuracy"] = common.accuracy(student, eval_set, device=device)

    engine.on_epoch_end = on_epoch_end  # an instance hook: the Distiller calls it before writing the checkpoint
    with common.Timer() as timer:
        try:
            history = engine.fit(common.loader(IndexedDataset(subset), cfg.batch_size, seed=seed))
            resumed = engine.resumed_from
        finally:
            engine.close()
    epochs_done = [r for r in history if r.get("type") == "epoch" and not r.get("partial")]
    curve = [[r["epoch"] + 1, r["eval_set_accuracy"]] for r in epochs_done if "eval_set_accuracy" in r]
    if not curve or curve[-1][0] != epochs:
        raise RuntimeError(f"{method} run ended without an evaluation after its last epoch {epochs}: {curve}")
    return {"method": method, "setting": setting, "seed": seed, "train_images": len(subset), "epochs": epochs,
            "steps": epochs_done[-1]["step"], "accuracy": curve[-1][1], "curve": curve,
            "epoch_time_s": [r["time_s"] for r in epochs_done],
            "steps_per_epoch": math.ceil(len(subset) / cfg.batch_size),
            "bss_epochs": [r.get("bss") for r in epochs_done] if method == "bss" else None,
            "time_s": timer.seconds, "resumed_from_epoch": None if resumed is None else resumed[0]}


def _tune_kd(teacher, model_kwargs, train_part, validation, cfg: ReproductionConfig, store, device, clamp) -> dict:
    """The KD baseline's (temperature, weight) chosen on the validation split: one KD run per setting of the
    grid at ``tune_fraction`` of the training part (first seed), scored by its validation accuracy. The test
    set is not an argument: it cannot leak into the choice."""
    seed, fraction = cfg.seeds[0], cfg.tune_fraction
    subset = common.fraction_subset(train_part, fraction, seed=seed)
    epochs = cfg.epochs_at(fraction)
    records = {}

    def score(setting: dict) -> float:
        key = f"tune-kd-T{setting['temperature']:g}-w{setting['kd_scale']:g}-f{fraction:g}-s{seed}"
        records[key] = store.run(key, lambda: {**_train_run("kd", setting, teacher, model_kwargs, subset, validation,
                                                             cfg, epochs, seed, device, clamp,
                                                             store.checkpoint_dir(key), points=1),
                                               "evaluated_on": "validation", "eval_images": len(validation)})
        return records[key]["accuracy"]

    if len(cfg.grid()) == 1:  # nothing to choose: no tuning run
        return {"best": cfg.grid()[0], "table": [], "fraction": fraction, "seed": seed, "runs": {}}
    tuned = protocol.tune_on_validation(cfg.grid(), score)
    return {**tuned, "fraction": fraction, "seed": seed, "epochs": epochs, "validation_images": len(validation),
            "runs": records}


def _summaries(runs: list, cfg: ReproductionConfig) -> dict:
    """Per method and fraction: accuracies by seed, mean, std and the 95 % interval of the mean."""
    out = {}
    for method in FULL_METHODS:
        out[method] = {}
        for f in cfg.fractions:
            accs = [_find(runs, method, f, s)["accuracy"] for s in cfg.seeds]
            m, s = common.mean_std(accs)
            out[method][str(f)] = {"runs": accs, "mean": m, "std": s, "ci95": list(common.confidence_interval(accs))}
    return out


def _find(runs: list, method: str, fraction: float, seed: int) -> dict:
    return next(r for r in runs if r["method"] == method and r["fraction"] == fraction and r["seed"] == seed)


def _claims(runs: list, cfg: ReproductionConfig) -> dict:
    """Paired (by seed) differences with their verdicts: BSS - KD and KD - CE per fraction, and whether
    BSS's advantage over KD is larger at the smallest fraction than at the largest."""
    by = {m: {f: [_find(runs, m, f, s)["accuracy"] for s in cfg.seeds] for f in cfg.fractions} for m in FULL_METHODS}
    out = {"bss_vs_kd": {}, "kd_vs_ce": {}, "bss_vs_ce": {}}
    for f in cfg.fractions:
        out["bss_vs_kd"][str(f)] = protocol.claim(by["bss"][f], by["kd"][f])
        out["kd_vs_ce"][str(f)] = protocol.claim(by["kd"][f], by["ce"][f])
        out["bss_vs_ce"][str(f)] = protocol.claim(by["bss"][f], by["ce"][f])
    small, large = min(cfg.fractions), max(cfg.fractions)
    if small != large:
        gap = lambda f: common.paired_differences(by["bss"][f], by["kd"][f])  # noqa: E731
        out["grows_as_data_shrinks"] = {"small": small, "large": large, **protocol.claim(gap(small), gap(large))}
    return out


def _plot_accuracy_vs_fraction(summary: dict, cfg: ReproductionConfig, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 4.0))
    xs = [100 * f for f in cfg.fractions]
    for i, (method, label) in enumerate(FULL_METHODS.items()):
        s = {float(k): v for k, v in summary[method].items()}
        means = [100 * s[f]["mean"] for f in cfg.fractions]
        half = [100 * (s[f]["ci95"][1] - s[f]["mean"]) if math.isfinite(s[f]["ci95"][1]) else 0.0 for f in cfg.fractions]
        shifted = [x * (1 + 0.04 * (i - 1)) for x in xs]  # keep the error bars apart
        ax.errorbar(shifted, means, yerr=half, fmt="-o", ms=4, capsize=3, color=common.colour(method), label=label)
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("training data used (% of the training part)")
    ax.set_ylabel("student test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title + "\nmean over seeds, bars: 95 % interval of the mean", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(runs: list, cfg: ReproductionConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cfg.fractions), figsize=(3.2 * len(cfg.fractions), 3.0), squeeze=False)
    for ax, f in zip(axes[0], cfg.fractions):
        for method, label in FULL_METHODS.items():
            for j, seed in enumerate(cfg.seeds):
                curve = _find(runs, method, f, seed)["curve"]
                ax.plot([c[0] for c in curve], [100 * c[1] for c in curve], "-o", ms=2, lw=1, alpha=0.8,
                        color=common.colour(method), label=label if j == 0 else None)
        ax.set_title(f"{100 * f:g}% of the data", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Training curves (one line per seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_costs(runs: list, cfg: ReproductionConfig) -> dict:
    """Per fraction: mean milliseconds per step of each method's runs over the epochs where BSS's term was
    on, leaving out epoch 1 (it also fills the teacher-logit cache), and BSS / KD over the same epochs:
    the cost measured in the runs themselves."""
    out = {}
    for f in cfg.fractions:
        epochs = cfg.epochs_at(f)
        active = [e for e in range(1, epochs + 1) if bss_weights(e, epochs)[1] > 0 and e > 1]
        if not active:
            continue
        row = {}
        for method in FULL_METHODS:
            per_step = []
            for s in cfg.seeds:
                r = _find(runs, method, f, s)
                per_step += [r["epoch_time_s"][e - 1] / r["steps_per_epoch"] for e in active]
            row[method] = 1e3 * sum(per_step) / len(per_step)
        row["bss_over_kd"] = row["bss"] / row["kd"] if row["kd"] > 0 else None
        row["epochs"] = active
        out[str(f)] = row
    return out


def _check_same_protocol(out_dir: str, cfg: ReproductionConfig, dataset: str, n_train: int, n_test: int) -> None:
    """The stored runs of ``out_dir`` are reused only under the protocol that made them: ``protocol.json``
    records it (seeds aside: adding a seed adds runs), and another protocol is refused before any training."""
    current = {**asdict(cfg), "dataset": dataset, "train_images": n_train, "test_images": n_test}
    current.pop("seeds")
    changed = protocol.settings_differ(os.path.join(out_dir, "protocol.json"), current)
    if changed:
        raise ValueError(f"{out_dir} holds runs of another protocol (it differs in {', '.join(changed)}): "
                         "choose another --out, or delete that folder to start afresh")


def reproduce(cfg: ReproductionConfig, out_dir: str, device, *, dataset: str = "fashion-mnist", train=None,
              test=None) -> dict:
    """The protocol of ``--budget full`` on (``train``, ``test``): teacher (cached), KD grid on the validation
    split, CE / KD / BSS runs (each stored when done, checkpointed every epoch: a killed experiment re-run with
    the same command skips what finished and resumes what was cut), claims, figures. Returns the results."""
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device(device)
    _check_same_protocol(out_dir, cfg, dataset, len(train), len(test))
    store = protocol.RunStore(out_dir)
    with common.Timer() as total:
        train_part, validation = protocol.validation_split(train, cfg.validation_fraction, seed=0)
        teacher, model_kwargs, teacher_acc, cache = protocol.reference_teacher(dataset, train_part, test,
                                                                               device=device, **cfg.teacher)
        teacher = teacher.to(device).eval().requires_grad_(False)
        clamp = _clamp_range(train_part)
        with common.Timer() as tuning_timer:
            tuning = _tune_kd(teacher, model_kwargs, train_part, validation, cfg, store, device, clamp)
        setting = tuning["best"]
        runs = []
        for fraction, epochs in zip(cfg.fractions, cfg.epochs):
            for seed in cfg.seeds:
                subset = common.fraction_subset(train_part, fraction, seed=seed)  # shared by the three methods
                for method in FULL_METHODS:
                    key = f"{method}-f{fraction:g}-s{seed}"
                    record = store.run(key, lambda: _train_run(
                        method, {} if method == "ce" else setting, teacher, model_kwargs, subset, test, cfg, epochs,
                        seed, device, clamp, store.checkpoint_dir(key), cfg.curve_points))
                    runs.append({**record, "fraction": fraction, "key": key})
                    print(f"bss experiment: {METHODS[method]:>3} {100 * fraction:5.1f}% data seed {seed}: "
                          f"{100 * record['accuracy']:.2f}% ({record['steps']} steps, {record['time_s']:.0f} s)",
                          flush=True)
        summary = _summaries(runs, cfg)
        claims = _claims(runs, cfg)
        convergence = {}
        for f in cfg.fractions:
            curves = {METHODS[m]: [[c[1] for c in _find(runs, m, f, s)["curve"]] for s in cfg.seeds]
                      for m in FULL_METHODS}
            rows, every = protocol.tail_table(curves)
            convergence[str(f)] = {"rows": rows, "all_converged": every}
        student_kwargs = {**model_kwargs, "width_mult": cfg.student_width}
        cost = measure_step_cost(teacher, student_kwargs, train_part, cfg, device.type, clamp,
                                 make_student=lambda seed: _build_student(cfg, model_kwargs, seed))
        grid = boundary_grid(teacher, test, os.path.join(out_dir, "bss_samples.png"), n=6, clamp=clamp, device=device)
        _plot_accuracy_vs_fraction(summary, cfg, os.path.join(out_dir, "accuracy_vs_data.png"),
                                   f"{cfg.student} student from a {cache_name(cfg)} teacher on {dataset}")
        _plot_curves(runs, cfg, os.path.join(out_dir, "training_curves.png"))
    student = _build_student(cfg, model_kwargs, 0)
    return {"protocol": "full", "config": asdict(cfg),
            "teacher": {"model": cache_name(cfg), "test_accuracy": teacher_acc, "train_s": cache["train_s"],
                        "cache": cache, "parameters": sum(p.numel() for p in teacher.parameters())},
            "student": {"model": cfg.student, "width": cfg.student_width,
                        "parameters": sum(p.numel() for p in student.parameters())},
            "data": {**common.data_info(train_part, test, dataset), "validation": len(validation),
                     "clamp": list(clamp)},
            "tuning": tuning, "tuning_s": tuning_timer.seconds, "kd_setting": setting, "runs": runs,
            "summary": summary, "claims": claims, "convergence": convergence, "step_cost": cost,
            "run_cost": _run_costs(runs, cfg), "grid": grid, "time_s": total.seconds,
            "threads": torch.get_num_threads()}


def cache_name(cfg: ReproductionConfig) -> str:
    """The teacher's architecture under ``cfg`` (the reference teacher's unless overridden)."""
    return {**protocol.REFERENCE_TEACHER, **cfg.teacher}["name"]


def _verdict_line(c: dict) -> str:
    return (f"{100 * c['mean']:+.2f} ± {100 * c['std']:.2f} points {common.fmt_ci(c['ci95'])} → **{c['verdict']}**")


def render_reproduction(results: dict, heading: str = "#") -> str:
    """report.md of the full protocol: setting, tuning, accuracies, paired differences and verdicts per claim,
    convergence, cost, time."""
    cfg, data, t, s = results["config"], results["data"], results["teacher"], results["student"]
    fractions = [float(f) for f in cfg["fractions"]]
    setting = results["kd_setting"]
    tuning = results["tuning"]
    pct = lambda f: f"{100 * f:g}%"  # noqa: E731
    teacher_time = "loaded from the cache" if t["cache"]["cached"] else f"trained in {t['train_s'] / 60:.1f} min"
    lines = [
        f"{heading} BSS on {data['name']}: does BSS beat a tuned KD baseline, more so with less data?", "",
        "Claims tested (Heo, Lee, Yun, Choi, AAAI 2019): BSS beats Hinton KD for the same student, and its advantage "
        "grows as training data shrinks.", "",
        f"{heading}# Setting", "",
        f"- Data: {data['train']:,} training images (the training part after holding out a class-stratified "
        f"{100 * cfg['validation_fraction']:g}% = {data['validation']:,} validation images, seed 0), "
        f"{data['test']:,} test images. Class-stratified subsets of the training part at "
        + ", ".join(pct(f) for f in fractions) + "; the seed draws the subset, shared by CE, KD and BSS.",
        f"- Teacher: {t['model']} (protocol.reference_teacher), {100 * t['test_accuracy']:.2f}% test accuracy, "
        f"{t['parameters']:,} parameters; trained once on the training part and cached "
        f"({teacher_time}, "
        "not counted in the experiment's time).",
        f"- Student: {s['model']} (width {s['width']:g}, {s['parameters']:,} parameters).",
        f"- Every run: SGD lr {cfg['lr']:g}, momentum 0.9, weight decay {cfg['weight_decay']:g}, batch "
        f"{cfg['batch_size']}, lr x0.1 at 1/2 and 3/4 of its epochs (the official 40 and 60 of 80), no augmentation "
        "(the teacher had none either); epochs per fraction: "
        + ", ".join(f"{pct(f)}: {e}" for f, e in zip(fractions, cfg["epochs"])) + f"; seeds {list(cfg['seeds'])}.",
        "- Schedules scaled to the epoch budget: the official weights are functions of e/E (e = 1..E), so with E "
        "epochs the clean-KD weight is kd_scale x (3(1 - e/E) + 1) and the BSS weight max(2(1 - 4e/3E), 0) (off "
        "from 3/4 of the epochs on). Attack as in the official code: 10 steps of 0.3 on the teacher's logits, "
        f"both-correct base samples, up to {cfg['max_samples']} per batch (the official 64 of 256, scaled to the "
        f"batch), clamp to the data's pixel range {tuple(round(v, 2) for v in data['clamp'])}.",
        f"- KD baseline tuned on the validation split, never the test set: grid T in {list(cfg['kd_temperatures'])} x "
        f"KD weight factor in {list(cfg['kd_scales'])} (1 = official), one KD run per setting at "
        f"{pct(tuning['fraction'])} of the data (seed {tuning['seed']}), scored by validation accuracy. Chosen: "
        f"**T = {setting['temperature']:g}, weight x{setting['kd_scale']:g}**. BSS uses the same T and KD weight for "
        "its clean KD term, plus its own official boundary term (at the same T, as in the official code).", ""]
    if tuning["table"]:
        lines += ["| T | KD weight factor | validation accuracy (%) |", "|---:|---:|---:|"]
        for row in tuning["table"]:
            lines.append(f"| {row['setting']['temperature']:g} | {row['setting']['kd_scale']:g} | "
                         f"{100 * row['val_accuracy']:.2f} |")
        lines.append("")
    lines += [f"{heading}# Student test accuracy (%), mean ± std over seeds", "",
              "| method | " + " | ".join(f"{pct(f)} data" for f in fractions) + " |", "|---" * (1 + len(fractions)) + "|"]
    for method, label in METHODS.items():
        lines.append(f"| {label} | " + " | ".join(common.fmt_mean_std(results["summary"][method][str(f)]["runs"])
                                                for f in fractions) + " |")
    claims = results["claims"]
    lines += ["", f"{heading}# Paired differences (same seed and subset) and verdicts", "",
              "Points: mean ± std of the per-seed differences [95 % t interval]; verdict: reproduced when the interval "
              "lies above 0, not reproduced below, inconclusive when it straddles 0.", "",
              "| comparison | " + " | ".join(f"{pct(f)} data" for f in fractions) + " |", "|---" * (1 + len(fractions)) + "|"]
    for key, label in (("bss_vs_kd", "BSS − KD"), ("kd_vs_ce", "KD − CE"), ("bss_vs_ce", "BSS − CE")):
        lines.append(f"| {label} | " + " | ".join(_verdict_line(claims[key][str(f)]) for f in fractions) + " |")
    lines += ["", f"{heading}# Verdicts per claim", ""]
    for f in fractions:
        lines.append(f"- BSS beats KD at {pct(f)} of the data: {_verdict_line(claims['bss_vs_kd'][str(f)])}.")
    grows = claims.get("grows_as_data_shrinks")
    if grows is not None:
        lines.append(f"- BSS's advantage over KD grows as data shrinks ((BSS − KD) at {pct(grows['small'])} minus "
                     f"(BSS − KD) at {pct(grows['large'])}, paired by seed): {_verdict_line(grows)}.")
    converged_all = all(c["all_converged"] for c in results["convergence"].values())
    lines += ["", f"{heading}# Convergence", "",
              "A run converged when its test accuracy moved by less than 1 point over the last 20 % of its schedule "
              "(`training_curves.png`).", ""]
    for f in fractions:
        conv = results["convergence"][str(f)]
        lines += [f"{pct(f)} of the data:", "", "| method | runs converged | largest move in the last 20 % |",
                  "|---|---|---|", *conv["rows"], ""]
    # Which cells hold a run that had not converged; the claims compare BSS with KD, so say whether those stand.
    moving = [(m, f) for f in fractions for m in FULL_METHODS
              if not protocol.every_run_converged([[c[1] for c in r["curve"]] for r in results["runs"]
                                                   if r["method"] == m and r["fraction"] == f])]
    named = ", ".join(f"{METHODS[m]} at {pct(f)}" for m, f in moving)
    if converged_all:
        lines.append("Every run converged: the verdicts above stand on converged students.")
    elif all(m == "ce" for m, _ in moving):
        lines.append(f"**Budget too small** for the comparisons with {named}: not every run of those converged. "
                     "Every KD and BSS run converged, so the BSS − KD verdicts stand on converged students.")
    else:
        lines.append(f"**Budget too small** for {named}: not every run there converged (table above); verdicts "
                     "that involve those cells are not conclusions about the methods.")
    c = results["step_cost"]
    lines += ["", f"{heading}# Cost", ""]
    for f, row in results["run_cost"].items():
        lines.append(f"- In the runs at {pct(float(f))} (epochs {row['epochs']} with BSS's term on, all seeds): CE "
                     f"{row['ce']:.0f} ms, KD {row['kd']:.0f} ms, BSS {row['bss']:.0f} ms per step: **BSS / KD = "
                     f"{row['bss_over_kd']:.2f}x**.")
    lines += [f"- One step timed in turns (batch {c['batch_size']}, {c['rounds']} rounds, an untrained student, so "
              f"few both-correct base samples): KD {c['kd_ms']:.1f} ms, BSS {c['bss_ms']:.1f} ms, BSS / KD = "
              f"{c['ratio']:.2f}x ({c['attacked_per_step']:.0f} attacked samples, {c['teacher_calls_per_attack']:.1f} "
              "teacher calls per attack).",
              f"- KD and BSS reuse the teacher's clean logits after their first epoch (deterministic data, frozen "
              f"teacher). {results['threads']} CPU threads; the machine may have been shared.", "",
              f"Run time {results['time_s'] / 60:.1f} min (KD tuning {results['tuning_s'] / 60:.1f} min), "
              "teacher training apart. Files: `accuracy_vs_data.png` (mean and 95 % interval per fraction), "
              "`training_curves.png`, `bss_samples.png`, `results.json` (every run, its curve and the command), "
              "`runs/` (the finished runs a re-run skips), `checkpoints/`.", ""]
    return "\n".join(lines)
