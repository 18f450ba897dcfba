"""The data-free experiment (``kdfast experiment datafree``) and its demo section, for DAFL, DFAD and
RDSKD together (the methods: :mod:`kdfast.methods.dafl`, :mod:`kdfast.methods.dfad`, :mod:`kdfast.methods.rdskd`).

On the chosen dataset (the embedded digits in the tour) a teacher is trained with data; students are then trained without any
training image by DAFL, DFAD and RDSKD, against KD on the real training set (upper bound) and KD on
Gaussian-noise images (lower bound). Also measured: RDSKD's two claims (the spread of final
accuracy over a small hyper-parameter grid per method; the diversity of generated samples: class
histogram of the teacher's predictions, mean pairwise distance) and the students' PGD robustness.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .. import methods
from ..methods import dafl, dfad, rdskd
from ..methods.datafree_base import (GeneratorCollapse, NoiseKD, class_histogram, entropy_bits, infer_num_classes,
                                     mean_pairwise_distance)
from . import common

NAME = "datafree"
# the tour titles the section with DAFL's TITLE and cites DAFL's PAPER (the other two in the section's text)
TITLE = dafl.TITLE
PAPER = dafl.PAPER

DATA_FREE = ("dafl", "dfad", "rdskd")
METHODS = ("kd_real", "kd_noise") + DATA_FREE
LABELS = {"kd_real": "KD, real data (upper bound)", "kd_noise": "KD, Gaussian noise (lower bound)",
          "dafl": "DAFL", "dfad": "DFAD", "rdskd": "RDSKD"}
TEACHER = ("vgg8", 0.25)
STUDENT = ("lenet5", 0.5)    # "LeNet-5-half" of the DAFL / DFAD / RDSKD MNIST experiments
KD_TEMPERATURE = 4.0         # the two KD bounds: soft targets only (alpha = 1), Adam lr 2e-3
PGD_EPS = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255)


@dataclass
class Config:
    seeds: List[int]
    teacher_epochs: int
    batch_size: int
    # per method: {"steps_per_epoch": n, "epochs": n} (+ "generator_epochs" for RDSKD)
    schedule: Dict[str, Dict[str, int]]
    grid: Dict[str, List[Dict[str, Any]]]   # method -> list of option overrides (sensitivity)
    diversity_samples: int = 512
    pgd_steps: int = 10
    train_subset: Optional[int] = None      # tiny test runs: fewer training / test images
    test_subset: Optional[int] = None


def _grid(full: bool) -> Dict[str, List[Dict[str, Any]]]:
    """One-factor-at-a-time variations around each method's defaults: the generator's learning rate
    x0.1 and x10, half the batch, and for DAFL its loss weights (the settings RDSKD says the other
    methods are sensitive to)."""
    grid = {
        "dafl": [{"lr_g": 0.02}, {"lr_g": 2.0}, {"ie": 20.0}, {"a": 1.0}, {"batch_size": 0.5}],
        "dfad": [{"lr_g": 1e-4}, {"lr_g": 1e-2}, {"batch_size": 0.5}],
        "rdskd": [{"lr_g": 1e-4}, {"lr_g": 1e-2}, {"batch_size": 0.5}],
    }
    if not full:
        grid = {"dafl": [{"lr_g": 0.02}, {"ie": 20.0}], "dfad": [{"lr_g": 1e-2}], "rdskd": [{"lr_g": 1e-2}]}
    return grid


def config(quick: bool) -> Config:
    if quick:
        return Config(seeds=[0, 1], teacher_epochs=8, batch_size=64, schedule={
            "kd_real": {"epochs": 6}, "kd_noise": {"steps_per_epoch": 20, "epochs": 6},
            "dafl": {"steps_per_epoch": 20, "epochs": 6}, "dfad": {"steps_per_epoch": 10, "epochs": 4},
            "rdskd": {"steps_per_epoch": 20, "generator_epochs": 2, "epochs": 6}},
            grid=_grid(False), diversity_samples=256, pgd_steps=5)
    return Config(seeds=[0, 1, 2], teacher_epochs=12, batch_size=128, schedule={
        "kd_real": {"epochs": 30}, "kd_noise": {"steps_per_epoch": 120, "epochs": 10},
        "dafl": {"steps_per_epoch": 120, "epochs": 10}, "dfad": {"steps_per_epoch": 50, "epochs": 6},
        "rdskd": {"steps_per_epoch": 120, "generator_epochs": 3, "epochs": 10}},
        grid=_grid(True), diversity_samples=1024, pgd_steps=10)


def tiny_config() -> Config:
    """A seconds-long configuration exercising every part of the experiment (tests)."""
    return Config(seeds=[0], teacher_epochs=1, batch_size=8, schedule={
        "kd_real": {"epochs": 1}, "kd_noise": {"steps_per_epoch": 2, "epochs": 1},
        "dafl": {"steps_per_epoch": 2, "epochs": 1}, "dfad": {"steps_per_epoch": 1, "epochs": 1},
        "rdskd": {"steps_per_epoch": 2, "generator_epochs": 1, "epochs": 1}},
        grid={"dafl": [{"lr_g": 0.02}], "dfad": [], "rdskd": [{"batch_size": 0.5}]}, diversity_samples=16,
        pgd_steps=1, train_subset=96, test_subset=48)


def _log(msg: str) -> None:
    print(f"[datafree] {msg}", flush=True)


def _student(kwargs):
    from .. import models

    return models.build(STUDENT[0], width_mult=STUDENT[1], **{k: v for k, v in kwargs.items() if k != "width_mult"})


def _eval_curve(history) -> List[float]:
    records = history["student"] if isinstance(history, dict) else history
    return [r["eval_accuracy"] for r in records if r.get("type", "epoch") == "epoch" and "eval_accuracy" in r]


def train_one(method: str, teacher, model_kwargs, train_set, test_set, cfg: Config, seed: int, device,
              overrides: Optional[Dict[str, Any]] = None, checkpoint_dir: Optional[str] = None) -> Dict[str, Any]:
    """Train one student by ``method``; returns accuracy curve, final accuracy, time, the student and
    (data-free methods) the generator, or ``collapsed`` with the error message."""
    from .. import losses
    from ..distill import Distiller, seed_everything

    sched = dict(cfg.schedule[method])
    overrides = dict(overrides or {})
    batch = cfg.batch_size
    if "batch_size" in overrides:  # a factor of the configured batch size
        batch = max(2, int(round(batch * overrides.pop("batch_size"))) // 2 * 2)
    seed_everything(seed)
    student = _student(model_kwargs)
    image_shape = (train_set.in_channels, train_set.image_size, train_set.image_size)
    engine_kw = dict(seed=seed, device=device, progress=False)
    out: Dict[str, Any] = {"method": method, "seed": seed, "overrides": dict(overrides), "batch_size": batch}
    test_loader = common.loader(test_set, 256, shuffle=False)
    start = time.perf_counter()
    generator = None
    engine = None
    try:
        if method == "kd_real":
            engine = Distiller(teacher, student, {"kd": losses.KDLoss(KD_TEMPERATURE, alpha=1.0)}, optimizer="adam",
                               lr=2e-3, weight_decay=0.0, epochs=sched["epochs"], **engine_kw)
            history = engine.fit(common.loader(train_set, batch, seed=seed), eval_loader=test_loader)
            out["student_steps"] = sched["epochs"] * math.ceil(len(train_set) / batch)
        elif method == "kd_noise":
            engine = NoiseKD(teacher, student, image_shape=image_shape, num_classes=infer_num_classes(teacher, image_shape),
                             batch_size=batch, steps_per_epoch=sched["steps_per_epoch"], temperature=KD_TEMPERATURE,
                             optimizer="adam", lr=2e-3, weight_decay=0.0, epochs=sched["epochs"], **engine_kw)
            history = engine.fit(None, eval_loader=test_loader)
            out["student_steps"] = sched["epochs"] * sched["steps_per_epoch"]
        else:
            module = methods.get(method)
            opts = {**sched, **overrides, "batch_size": batch, "image_size": image_shape[1],
                    "channels": image_shape[0], **engine_kw}
            if checkpoint_dir is not None:
                opts["checkpoint_dir"] = checkpoint_dir
            engine = module.build(teacher, student, **opts)
            generator = engine.generator
            history = engine.fit(None, eval_loader=test_loader)
            per_step = module.OPTIONS.get("student_steps", 1)
            out["student_steps"] = sched["epochs"] * sched["steps_per_epoch"] * per_step
        out["curve"] = _eval_curve(history)
        out["final_accuracy"] = out["curve"][-1]
        out["collapsed"] = None
    except GeneratorCollapse as err:
        out["collapsed"] = str(err)
        out["curve"] = []
        out["final_accuracy"] = common.accuracy(student, test_set, device=device)
    finally:
        if engine is not None:
            engine.close()
    out["time_s"] = time.perf_counter() - start
    out["student"] = student.eval()
    out["generator"] = generator
    return out


# ------------------------------------------------------------------------------------------ measures
@torch.no_grad()
def generated_samples(method: str, generator, n: int, seed: int = 1234, device="cpu") -> torch.Tensor:
    """``n`` images from ``generator`` in the mode its student saw them (DAFL and DFAD: train-mode
    BatchNorm, as their loops never switch the generator to eval; RDSKD: eval mode)."""
    was_training = generator.training
    state = {k: v.clone() for k, v in generator.state_dict().items()}  # train-mode BN must not move the stats
    generator.train(method != "rdskd")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator.latent_dim, generator=g).to(device)
    x = torch.cat([generator(chunk) for chunk in z.split(256)])
    generator.load_state_dict(state)
    generator.train(was_training)
    return x.cpu()


@torch.no_grad()
def diversity(teacher, images: torch.Tensor, num_classes: int, device="cpu") -> Dict[str, Any]:
    logits = torch.cat([teacher(chunk.to(device)).float().cpu() for chunk in images.split(256)])
    hist = class_histogram(logits, num_classes)
    return {"class_histogram": hist.tolist(), "class_entropy_bits": entropy_bits(hist.tolist()),
            "max_entropy_bits": math.log2(num_classes), "classes_present": int((hist > 0).sum()),
            "mean_pairwise_distance": mean_pairwise_distance(images)}


def robustness(student, test_set, steps: int, device="cpu") -> Dict[str, Any]:
    from ..robustness import robustness_report

    report = robustness_report(student, common.loader(test_set, 256, shuffle=False), eps=list(PGD_EPS),
                               pgd_steps=steps, clamp=test_set.clamp_range, std=test_set.std, device=device)
    return report.to_dict()


# ------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_pixels(images: torch.Tensor, dataset) -> torch.Tensor:
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


def plot_samples(samples: Dict[str, torch.Tensor], real: torch.Tensor, dataset, path: str, n: int = 32) -> str:
    plt = _plt()
    rows = [(f"real {dataset.name} (test set)", real)] + [(LABELS[m], x) for m, x in samples.items()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.25 * len(rows) + 0.3))
    axes = [axes] if len(rows) == 1 else axes
    for ax, (title, x) in zip(axes, rows):
        x = _to_pixels(x[:n], dataset)
        strip = torch.cat(list(x[:, 0]), dim=1) if x.shape[1] == 1 else torch.cat(list(x.permute(0, 2, 3, 1)), dim=1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(curves: Dict[str, List[List[float]]], teacher_acc: float, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for m, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        length = min(len(r) for r in runs)
        t = torch.tensor([r[:length] for r in runs], dtype=torch.float64) * 100
        x = [(i + 1) / length for i in range(length)]
        ax.plot(x, t.mean(0).tolist(), label=LABELS[m], color=common.colour(m))
        if t.shape[0] > 1:
            ax.fill_between(x, (t.mean(0) - t.std(0)).tolist(), (t.mean(0) + t.std(0)).tolist(),
                            color=common.colour(m), alpha=0.15)
    ax.axhline(100 * teacher_acc, color=common.colour("teacher"), ls="--", label="teacher")
    ax.set_xlabel("fraction of the training schedule (epochs differ per method)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sensitivity(grid_results: Dict[str, List[Dict[str, Any]]], path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for i, (m, runs) in enumerate(grid_results.items()):
        for r in runs:
            acc = 100 * r["final_accuracy"]
            ax.scatter(i, acc, color=common.colour(m), marker="x" if r["collapsed"] else "o", s=36)
            ax.annotate(r["label"], (i, acc), fontsize=6, xytext=(5, -2), textcoords="offset points")
        accs = [100 * r["final_accuracy"] for r in runs]
        ax.vlines(i, min(accs), max(accs), color=common.colour(m), alpha=0.4, lw=6)
    ax.set_xticks(range(len(grid_results)), [LABELS[m] for m in grid_results])
    ax.set_xlim(-0.5, len(grid_results) - 0.2)
    ax.set_ylabel("final student test accuracy (%)")
    ax.set_title("hyper-parameter sensitivity (x: generator collapsed, run stopped)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_diversity(div: Dict[str, Dict[str, Any]], path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(div), figsize=(2.4 * len(div), 2.6), sharey=True)
    axes = [axes] if len(div) == 1 else axes
    for ax, (name, d) in zip(axes, div.items()):
        hist = d["class_histogram"]
        ax.bar(range(len(hist)), [100 * h for h in hist], color=common.colour(name))
        ax.set_title(f"{LABELS.get(name, name)}\n{d['class_entropy_bits']:.2f} bits, dist {d['mean_pairwise_distance']:.1f}",
                     fontsize=7)
        ax.set_xticks(range(len(hist)))
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("% of samples (teacher's class)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ experiment
def _label(overrides: Dict[str, Any]) -> str:
    if not overrides:
        return "default"
    return ", ".join(f"{k}={'x' if k == 'batch_size' else ''}{v:g}" for k, v in overrides.items())


def run(out_dir: str, *, dataset: str = "digits", data_root=None, budget: str = "quick", seeds=None,
        device: str = "cpu") -> Dict[str, Any]:
    """``kdfast experiment datafree``: DAFL, DFAD and RDSKD against KD on real data and KD on noise, on
    ``dataset``; writes report.md, results.json and PNGs into ``out_dir``. Images: digits at 16x16; MNIST and
    Fashion-MNIST zero-padded to 32x32 (LeNet-5's input in the three papers); CIFAR at 32x32. "quick":
    seeds 0, 1 and short schedules (and on datasets other than digits a 10,000 / 2,000-image subset)."""
    seeds = common.check_run(dataset, budget, seeds, device)
    quick = budget == "quick"
    cfg = config(quick)
    if seeds is not None:
        cfg.seeds = list(seeds)
    if budget == "quick" and dataset != "digits":
        cfg.train_subset, cfg.test_subset = common.quick_subsets(dataset, budget)
    record = common.run_record(NAME, out_dir, dataset=dataset, data_root=data_root, budget=budget,
                               seeds=list(cfg.seeds), device=device)
    return run_config(out_dir, cfg, device=device, quick=quick, dataset=dataset, data_root=data_root, record=record)


def run_config(out_dir: str, cfg: Config, *, device="cpu", quick: bool = False, dataset: str = "digits",
               data_root=None, record: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The experiment with an explicit :class:`Config` (:func:`config`, :func:`tiny_config`)."""
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    device = torch.device(device)
    if dataset == "digits":
        train_set, test_set = common.digits(16, train_subset=cfg.train_subset, test_subset=cfg.test_subset)
    else:
        train_set, test_set = common.load_data(dataset, data_root, pad_to=32 if dataset in ("mnist", "fashion-mnist")
                                               else None, train_subset=cfg.train_subset, test_subset=cfg.test_subset)
    teacher, model_kwargs, teacher_acc, cache = common.cached_teacher(
        dataset, train_set, test_set, name=TEACHER[0], width=TEACHER[1], epochs=cfg.teacher_epochs, device=device,
        use_cache=record is not None)
    num_classes = train_set.num_classes

    _log(f"teacher {TEACHER[0]}-{TEACHER[1]}: {100 * teacher_acc:.2f}% ({time.perf_counter() - t_start:.0f} s)")
    runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in METHODS}
    for seed in cfg.seeds:
        for m in METHODS:
            r = train_one(m, teacher, model_kwargs, train_set, test_set, cfg, seed, device)
            runs[m].append(r)
            _log(f"seed {seed} {m}: {100 * r['final_accuracy']:.2f}% in {r['time_s']:.0f} s"
                 + (" (generator collapsed)" if r["collapsed"] else ""))

    # RDSKD's claim 1: spread of the final accuracy over a small grid (seed 0; "default" is the main run)
    grid: Dict[str, List[Dict[str, Any]]] = {}
    for m in DATA_FREE:
        default = runs[m][0]
        grid[m] = [{"label": "default", "final_accuracy": default["final_accuracy"], "collapsed": default["collapsed"],
                    "overrides": {}}]
        for ov in cfg.grid[m]:
            r = train_one(m, teacher, model_kwargs, train_set, test_set, cfg, cfg.seeds[0], device, overrides=ov)
            _log(f"grid {m} {_label(ov)}: {100 * r['final_accuracy']:.2f}% in {r['time_s']:.0f} s"
                 + (" (generator collapsed)" if r["collapsed"] else ""))
            grid[m].append({"label": _label(ov), "final_accuracy": r["final_accuracy"], "collapsed": r["collapsed"],
                            "overrides": ov, "time_s": r["time_s"]})

    # RDSKD's claim 2: diversity of generated samples (seed 0 generators), with real digits and noise for scale
    real = torch.stack([test_set[i][0] for i in range(min(len(test_set), cfg.diversity_samples))])
    noise = torch.randn(cfg.diversity_samples, *real.shape[1:], generator=torch.Generator().manual_seed(0))
    div = {"real": diversity(teacher, real, num_classes, device), "kd_noise": diversity(teacher, noise, num_classes, device)}
    samples = {}
    for m in DATA_FREE:
        gen = runs[m][0]["generator"]
        if gen is None or runs[m][0]["collapsed"]:
            continue
        samples[m] = generated_samples(m, gen, cfg.diversity_samples, device=device)
        div[m] = diversity(teacher, samples[m], num_classes, device)

    # the students' adversarial robustness (PGD, L-inf, pixel units), every seed
    rob = {m: [robustness(r["student"], test_set, cfg.pgd_steps, device) for r in runs[m]] for m in METHODS}

    figures = [
        os.path.basename(plot_samples(samples, real, test_set, os.path.join(out_dir, "samples.png"))),
        os.path.basename(plot_curves({m: [r["curve"] for r in runs[m]] for m in METHODS}, teacher_acc,
                                     os.path.join(out_dir, "accuracy_curves.png"))),
        os.path.basename(plot_sensitivity(grid, os.path.join(out_dir, "sensitivity.png"))),
        os.path.basename(plot_diversity(div, os.path.join(out_dir, "diversity.png"))),
    ]
    total = time.perf_counter() - t_start
    results = {
        "quick": quick, "device": str(device), "seeds": cfg.seeds,
        "teacher": {"model": TEACHER, "accuracy": teacher_acc, "cache": cache},
        "data": common.data_info(train_set, test_set, dataset, data_root), "run": record,
        "student_model": STUDENT, "schedule": cfg.schedule, "batch_size": cfg.batch_size,
        "methods": {m: {"final_accuracy": [r["final_accuracy"] for r in runs[m]],
                        "mean": common.mean_std([r["final_accuracy"] for r in runs[m]])[0],
                        "std": common.mean_std([r["final_accuracy"] for r in runs[m]])[1],
                        "curves": [r["curve"] for r in runs[m]], "time_s": [r["time_s"] for r in runs[m]],
                        "student_steps": runs[m][0]["student_steps"],
                        "collapsed": [r["collapsed"] for r in runs[m]]} for m in METHODS},
        "sensitivity": {m: {"runs": grid[m], "spread": _spread(grid[m])} for m in DATA_FREE},
        "diversity": div, "robustness": rob, "figures": figures, "total_time_s": total,
    }
    common.write_report(out_dir, _report(results, cfg), results)
    return results


def _spread(runs) -> Dict[str, float]:
    accs = [r["final_accuracy"] for r in runs]
    m, s = common.mean_std(accs)
    return {"max_minus_min": max(accs) - min(accs), "std": s, "min": min(accs), "max": max(accs),
            "collapsed": sum(1 for r in runs if r["collapsed"])}


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.2f}"


def _report(res: Dict[str, Any], cfg: Config) -> str:
    ms = res["methods"]
    lines = [
        f"# Data-free knowledge distillation on {res['data']['name']}: DAFL, DFAD, RDSKD",
        "",
        f"{'Quick' if res['quick'] else 'Full'} run on {res['device']}, {res['total_time_s'] / 60:.1f} min. "
        f"Teacher {TEACHER[0]} (width {TEACHER[1]}) trained with data: {_pct(res['teacher']['accuracy'])}% test accuracy. "
        f"Students: {STUDENT[0]} width {STUDENT[1]} (the papers' 'LeNet-5-half'), seeds {res['seeds']}, batch "
        f"{res['batch_size']}. The data-free students never see a training image; the two KD bounds use "
        f"soft targets only (T = {KD_TEMPERATURE:g}, no labels) on the real training set (upper bound) or on "
        "N(0, I) images of the same shape (lower bound).",
        "",
        "## Test accuracy (%, mean ± std over seeds)",
        "",
        "| method | accuracy | per seed | student steps | time per run (s) | collapsed |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for m in METHODS:
        r = ms[m]
        lines.append(f"| {LABELS[m]} | {common.fmt_mean_std(r['final_accuracy'])} | "
                     f"{', '.join(_pct(a) for a in r['final_accuracy'])} | {r['student_steps']} | "
                     f"{sum(r['time_s']) / len(r['time_s']):.0f} | {sum(1 for c in r['collapsed'] if c)} |")
    best_df = max(DATA_FREE, key=lambda m: ms[m]["mean"])
    lines += ["", f"Best data-free method here: **{LABELS[best_df]}** ({_pct(ms[best_df]['mean'])}%). "
              f"Gap to KD on real data: {100 * (ms['kd_real']['mean'] - ms[best_df]['mean']):.2f} points; "
              f"margin over KD on noise: {100 * (ms[best_df]['mean'] - ms['kd_noise']['mean']):.2f} points.", ""]
    if res["quick"]:
        lines += ["Quick mode trains every student for a small fraction of the full schedule: the numbers show that "
                  "everything runs, not how the methods compare.", ""]
    lines += ["Schedules (scaled from the official MNIST settings; see each module's OPTIONS): "
              + "; ".join(f"{LABELS[m]}: {v}" for m, v in res["schedule"].items()), "",
              "![accuracy curves](accuracy_curves.png)", "",
              "## Claim 1: robustness to hyper-parameters (seed 0)", "",
              "One-factor-at-a-time variations around each method's defaults (batch_size=x0.5 halves the batch). "
              "A run whose generator collapses (NaN, or one class for a whole epoch) is stopped and its student "
              "evaluated as it was at that moment.", "",
              "| method | setting | accuracy (%) | collapsed |", "|---|---|---:|---|"]
    for m in DATA_FREE:
        for r in res["sensitivity"][m]["runs"]:
            lines.append(f"| {LABELS[m]} | {r['label']} | {_pct(r['final_accuracy'])} | "
                         f"{'yes' if r['collapsed'] else ''} |")
    lines += ["", "| method | spread max - min (points) | std over settings (points) | collapsed runs |",
              "|---|---:|---:|---:|"]
    for m in DATA_FREE:
        s = res["sensitivity"][m]["spread"]
        lines.append(f"| {LABELS[m]} | {100 * s['max_minus_min']:.2f} | {100 * s['std']:.2f} | {s['collapsed']} |")
    spreads = {m: res["sensitivity"][m]["spread"]["max_minus_min"] for m in DATA_FREE}
    least = min(spreads, key=spreads.get)
    lines += ["", "The methods are varied in different numbers of settings (more settings, more room for spread), "
              "each once (seed 0): the spread is a rough indication, not a test."]
    lines += ["", f"Smallest spread: **{LABELS[least]}**"
              + (" (RDSKD's claim holds on this grid)." if least == "rdskd" else
                 " (RDSKD's claim does not hold on this grid)."), "", "![sensitivity](sensitivity.png)", "",
              "## Claim 2: diversity of generated samples (seed 0 generators)", "",
              f"{cfg.diversity_samples} samples per generator; the teacher's predicted classes (entropy in bits, "
              "max log2 K) and the mean pairwise L2 distance between images (normalised units). Real test images "
              "and Gaussian noise for scale.", "",
              "| source | class entropy (bits) | classes present | mean pairwise distance |", "|---|---:|---:|---:|"]
    for name, d in res["diversity"].items():
        label = {"real": f"real {res['data']['name']} (test set)", "kd_noise": "Gaussian noise N(0, I)"}.get(name, LABELS.get(name, name))
        lines.append(f"| {label} | {d['class_entropy_bits']:.3f} / {d['max_entropy_bits']:.3f} | "
                     f"{d['classes_present']} | {d['mean_pairwise_distance']:.2f} |")
    lines += ["", "![diversity](diversity.png)", "", "![generated samples](samples.png)", "",
              "## Adversarial robustness of the students (PGD, L-inf, pixel units; mean over seeds)", "",
              "The seed paper's title says robustness, meaning robustness to hyper-parameters (claim 1 above); "
              f"this is the other reading: accuracy under a white-box PGD attack ({cfg.pgd_steps} steps, random "
              "start, step 2.5 eps / steps) on the test set.", "",
              "| method | " + " | ".join(f"eps {e * 255:g}/255" for e in PGD_EPS) + " |",
              "|---|" + "---:|" * len(PGD_EPS)]
    for m in METHODS:
        per_eps = list(zip(*[r["pgd"] for r in res["robustness"][m]]))
        lines.append(f"| {LABELS[m]} | " + " | ".join(common.fmt_mean_std(v) for v in per_eps) + " |")
    command = (res.get("run") or {}).get("command") or "kdfast experiment datafree --budget quick"
    lines += ["", f"Run it: `{command}` (or `python -c \"from kdfast.experiments import datafree; "
              "datafree.run('out', budget='quick')\"`).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ demo
def demo_section(ctx) -> "common.DemoSection":
    """The three methods in one section of ``kdfast demo``: each trains a student from the tour's
    teacher without training images, for a short schedule, and a sample strip is shown."""
    start = time.perf_counter()
    tiny = ctx.tiny
    steps = 2 if tiny else 15
    cfg = Config(seeds=list(ctx.seeds)[:1], teacher_epochs=0, batch_size=16 if tiny else 64, schedule={
        "kd_noise": {"steps_per_epoch": steps, "epochs": 1 if tiny else 3},
        "dafl": {"steps_per_epoch": steps, "epochs": 1 if tiny else 3},
        "dfad": {"steps_per_epoch": 1 if tiny else 6, "epochs": 1 if tiny else 3},
        "rdskd": {"steps_per_epoch": steps, "generator_epochs": 1, "epochs": 1 if tiny else 3}}, grid={})
    names = ("kd_noise",) + DATA_FREE
    results, samples = {}, {}
    for m in names:
        r = train_one(m, ctx.teacher, ctx.model_kwargs, ctx.train_set, ctx.test_set, cfg, cfg.seeds[0], ctx.device)
        results[m] = {"accuracy": r["final_accuracy"], "time_s": r["time_s"], "collapsed": r["collapsed"]}
        if r["generator"] is not None and not r["collapsed"]:
            samples[m] = generated_samples(m, r["generator"], 32, device=ctx.device)
    real = torch.stack([ctx.test_set[i][0] for i in range(32)])
    fig = plot_samples(samples, real, ctx.test_set, os.path.join(ctx.out_dir, "datafree_samples.png"))
    rows = "\n".join(f"| {LABELS[m]} | {_pct(r['accuracy'])} | {r['time_s']:.1f} | {'yes' if r['collapsed'] else ''} |"
                     for m, r in results.items())
    teacher_acc = common.accuracy(ctx.teacher, ctx.test_set, device=ctx.device)
    md = (f"Students ({STUDENT[0]} width {STUDENT[1]}) trained from the tour's teacher ({_pct(teacher_acc)}%) "
          "**without any training image**: a generator synthesises the images (DAFL, DFAD, RDSKD), against KD "
          "on Gaussian noise. A very short schedule (the full comparison, with the hyper-parameter "
          "sensitivity, sample diversity and PGD robustness, is `kdfast experiment datafree --budget full`).\n\n"
          "| method | test accuracy (%) | time (s) | generator collapsed |\n|---|---:|---:|---|\n"
          f"{rows}\n\n![generated samples]({os.path.basename(fig)})\n")
    md += (f"\nThis section covers the three data-free methods; besides DAFL (cited above): *{dfad.PAPER}*; "
           f"*{rdskd.PAPER}*.\n")
    # the tour titles a section with its module's TITLE and cites its PAPER: DAFL's, the first of the three
    return common.DemoSection(name=NAME, title=TITLE, markdown=md,
                            results={"teacher_accuracy": teacher_acc, "methods": results},
                            figures=[os.path.basename(fig)], time_s=time.perf_counter() - start)
