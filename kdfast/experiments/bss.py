"""The BSS experiment (Heo, Lee, Yun, Choi, AAAI 2019): CE vs KD vs BSS with limited training data.

A vgg8 teacher trained with cross-entropy, a vgg8 student at half its width (a quarter of its parameters)
trained by each method on class-stratified fractions of the training set, over seeds; paired (same seed
and subset) differences with 95 % confidence intervals; the cost of a BSS step against a KD step; and a
picture of boundary-supporting samples. The method itself: :mod:`kdfast.methods.bss`.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distill import Distiller
from ..methods.bss import PAPER, TITLE, BSSDistiller, bss_attack, kd_baseline, sample_target_classes
from . import common

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


def measure_step_cost(teacher, model_kwargs, train, cfg: ExperimentConfig, device, clamp, seed: int = 0) -> dict:
    """Median time of one KD step and one BSS step (same student, teacher and batch), timed in turns."""
    import statistics
    import time

    batch = (train.images[: cfg.batch_size], train.labels[: cfg.batch_size])
    engines = {"kd": kd_baseline(teacher, _student(model_kwargs, cfg.student_width, seed),
                                 **_engine_kwargs(cfg, 100, seed, device)),
               "bss": BSSDistiller(teacher, _student(model_kwargs, cfg.student_width, seed), max_samples=cfg.max_samples,
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
    """``kdfast experiment bss``: CE vs KD vs BSS on ``dataset``. "full": seeds 0, 1, 2 x data fractions
    10/25/50/100 %; "quick": seeds 0, 1, fractions 10 and 100 %, shorter runs (and on datasets other
    than digits a fixed 10,000-image training / 2,000-image test subset). The teacher is cached
    (:func:`kdfast.experiments.common.cached_teacher`). Writes report.md, results.json,
    accuracy_vs_data.png, bss_samples.png."""
    seeds = common.check_run(dataset, budget, seeds, device)
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
