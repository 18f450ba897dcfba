"""The protocol of the first source paper: Sadhukhan et al., "Knowledge Distillation Inspired Fine-Tuning of Tucker Decomposed CNNs and
Adversarial Robustness Analysis", ICIP 2020.

The paper decomposes a trained CNN (the teacher) with Tucker-2, then fine-tunes the decomposed network (the
student) by distilling from the undecomposed teacher instead of by cross-entropy alone, and compares accuracy
and adversarial robustness. Its datasets, models and numbers are not public. Two protocols live here:

* :func:`run` (``kdfast experiment kd``) tests the claim: :func:`run_reproduction` with the shared protocol
  of the reproductions (kdfast.experiments.protocol): the reference ResNet-26 teacher trained on the
  training part of a validation split, KD (and FSP's weight) tuned on the validation part, every recipe
  fine-tuned over the seeds with the same schedule, clean / FGSM / PGD-10 / PGD-50 accuracy, paired 95 %
  intervals and a verdict per claim, finished runs kept for resuming (docs/reproductions.md);
* :func:`run_protocol`, the tour's compact section (``kdfast demo``) on the digits data embedded in
  scikit-learn (kdfast.data, 1,347 train / 450 test, 16x16):

1. train the teacher (kdfast.models, default vgg8 at width 0.25) with cross-entropy;
2. decompose every 3x3 convolution but the stem (at least 16 channels in and out) with Tucker-2
   (kdfast.decompose, EVBMF ranks by default): the student before fine-tuning;
3. fine-tune copies of that student with the same optimiser, schedule, epochs and seed, only the loss
   differs (:data:`kdfast.methods.kd.RECIPES`): CE (the usual fine-tuning, Kim et al., ICLR 2016), KD (Hinton et al. 2015,
   T = 4, 0.9 KD + 0.1 CE), KD + NST (Huang & Wang 2017, poly kernel, weight 50 as RepDistiller's
   ``train_student.py``), KD + AT (Zagoruyko & Komodakis, ICLR 2017, beta = 1000);
4. evaluate every model: clean accuracy, FGSM and PGD accuracy per epsilon (kdfast.robustness, eps in
   pixel units of the [0, 1] images), parameters, MACs and measured inference latency;
5. repeat each fine-tuning with ``repeats`` seeds (default 3) and report mean, spread and the paired
   (same-seed) difference of each method to CE.

Both write report.md, results.json, training_curves.png, robustness.png and model checkpoints
(kdfast.model_file format: `kdfast robustness --checkpoint` and `kdfast decompose --checkpoint` read them).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.kd import PAPER, RECIPES, TITLE, build, feature_layers_for
from .. import attacks
from . import common, protocol

NAME = "kd"

DEFAULT_EPS = (0.0, 2 / 255, 4 / 255, 8 / 255, 16 / 255)


@dataclass
class DemoConfig:
    """The protocol's settings (the tour's ``kdfast demo`` reads and overrides them)."""

    out: str = "demo-output"
    device: str = "cpu"
    seed: int = 0
    teacher_epochs: int = 12
    student_epochs: int = 6
    model: str = "vgg8"
    width: float = 0.25
    image_size: int = 16
    batch_size: int = 64
    teacher_lr: float = 0.05
    student_lr: float = 0.01  # low fine-tuning LR: a high one trades robustness for accuracy
    ranks: str | float = "evbmf"
    methods: tuple = ("ce", "kd", "kd_nst", "kd_at")
    eps: tuple = DEFAULT_EPS
    pgd_steps: int = 10
    latency_batch: int = 64
    latency_repeats: int = 30
    repeats: int = 3  # fine-tuning runs per method (seeds seed, seed + 1, ...): spread of the comparison
    train_subset: int | None = None  # first N training images (tiny runs)
    test_subset: int | None = None
    tiny: bool = False

    @classmethod
    def tiny_config(cls, **overrides) -> "DemoConfig":
        """A seconds-long run exercising every step (tests): small model, data and attacks."""
        base = dict(
            teacher_epochs=1, student_epochs=1, width=0.125, train_subset=192, test_subset=96, eps=(0.0, 8 / 255),
            pgd_steps=2, latency_batch=8, latency_repeats=3, repeats=2, tiny=True,
        )
        base.update(overrides)
        return cls(**base)

def _log(msg: str) -> None:
    print(msg, flush=True)


def _decompose(model: nn.Module, ranks, input_shape, **rank_options):
    """kdfast.decompose with its default selection: every 3x3 conv but the stem, at least 16
    channels in and out. Returns (student, report); the teacher is left untouched (deep copy).
    ``rank_options``: weaken, min_rank, align for EVBMF ranks (kdfast.evbmf.tucker2_ranks)."""
    import kdfast

    return kdfast.decompose(model, ranks=ranks, input_shape=tuple(input_shape), **rank_options)


def _report_to_dict(report) -> dict:
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if dataclasses.is_dataclass(report):
        return dataclasses.asdict(report)
    if isinstance(report, dict):
        return report
    return {"text": str(report)}


# =============================================================================================== run
def run_protocol(cfg: DemoConfig, teacher: nn.Module | None = None, write_report: bool = True, data=None) -> dict:
    """Runs the protocol; returns the results dict (also written to cfg.out/results.json).

    ``data``: (dataset name, data root, train set, test set) of :func:`kdfast.experiments.common.load_data`;
    None: the embedded digits at ``cfg.image_size`` (with ``cfg.train_subset`` / ``cfg.test_subset``).

    ``teacher``: an already trained teacher of ``cfg.model`` / ``cfg.width`` on this data (the demo tour
    passes the one it trained); None trains one (``cfg.teacher_epochs``). The trained teacher is returned
    under ``results["_teacher"]`` (not serialised).
    """
    from .. import cost, models
    from .. import model_file as checkpoint
    from ..distill import Distiller, evaluate, seed_everything
    from ..robustness import plot_reports, robustness_report

    start = time.perf_counter()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    unknown = [m for m in cfg.methods if m not in RECIPES]
    if unknown:
        raise ValueError(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    os.makedirs(cfg.out, exist_ok=True)
    timings = {}

    # ---- data --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if data is None:
        dataset, root = "digits", None
        train_set, test_set = common.digits(cfg.image_size, cfg.train_subset, cfg.test_subset)
    else:
        dataset, root, train_set, test_set = data
    size = train_set.image_size
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256, shuffle=False)
    data_info = {"name": dataset, "image_size": size, "root": None if root is None else os.fspath(root)}
    in_shape = (1, train_set.in_channels, size, size)
    timings["data_s"] = time.perf_counter() - t0
    _log(f"data: {dataset} {size}x{size}, {len(train_set)} train / {len(test_set)} test images")

    model_kwargs = {"num_classes": train_set.num_classes, "in_channels": train_set.in_channels, "width_mult": cfg.width}

    def _engine(epochs, lr, seed):
        return dict(optimizer="sgd", lr=lr, momentum=0.9, weight_decay=5e-4, schedule="cosine", epochs=epochs,
                    device=device, seed=seed, progress=False)

    # ---- teacher -----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    history = {}
    if teacher is None:
        seed_everything(cfg.seed)
        teacher = models.build(cfg.model, **model_kwargs)
        trainer = Distiller(None, teacher, {"ce": nn.CrossEntropyLoss()}, **_engine(cfg.teacher_epochs, cfg.teacher_lr,
                                                                                      cfg.seed))
        history["teacher"] = trainer.fit(train_loader, eval_loader=test_loader)
        trainer.close()
    teacher = teacher.to(device).eval().requires_grad_(False)
    timings["teacher_train_s"] = time.perf_counter() - t0
    teacher_acc = evaluate(teacher, test_loader, device=device)["accuracy"]
    _log(f"teacher {cfg.model} (width {cfg.width:g}): {cfg.teacher_epochs} epochs in {timings['teacher_train_s']:.1f}s, "
         f"test accuracy {100 * teacher_acc:.2f}%")
    checkpoint.save_model(os.path.join(cfg.out, "teacher.pt"), teacher, cfg.model, model_kwargs, data_info,
                          {"role": "teacher", "test_accuracy": teacher_acc})

    # ---- decomposition -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    student0, dec_report = _decompose(teacher, cfg.ranks, in_shape[1:])
    student0 = student0.to(device)
    timings["decompose_s"] = time.perf_counter() - t0
    dec_acc = evaluate(student0, test_loader, device=device)["accuracy"]
    _log(f"decomposed ({cfg.ranks} ranks) in {timings['decompose_s']:.1f}s: test accuracy before fine-tuning {100 * dec_acc:.2f}%")
    checkpoint.save_model(os.path.join(cfg.out, "student_decomposed.pt"), student0, cfg.model, model_kwargs, data_info,
                          {"role": "decomposed student, not fine-tuned", "test_accuracy": dec_acc})

    # ---- fine-tuning -------------------------------------------------------------------------------
    layers = feature_layers_for(teacher)
    students, extra_runs = {}, {m: [] for m in cfg.methods}
    for method in cfg.methods:
        label = RECIPES[method][0]
        for run in range(cfg.repeats):
            # Every method sees the same seeds: run r of each method has the same data order.
            seed = cfg.seed + run
            t0 = time.perf_counter()
            seed_everything(seed)
            student = copy.deepcopy(student0).train().requires_grad_(True)
            trainer = build(teacher, student, recipe=method, feature_layers=(layers, layers),
                            **_engine(cfg.student_epochs, cfg.student_lr, seed))
            run_history = trainer.fit(train_loader, eval_loader=test_loader)
            trainer.close()
            student.eval()
            elapsed = time.perf_counter() - t0
            timings[f"finetune_{method}_s"] = timings.get(f"finetune_{method}_s", 0.0) + elapsed
            acc = evaluate(student, test_loader, device=device)["accuracy"]
            _log(f"student {label} (seed {seed}): {cfg.student_epochs} epochs in {elapsed:.1f}s, test accuracy {100 * acc:.2f}%")
            if run > 0:
                extra_runs[method].append((seed, student))
                continue
            history[method] = run_history
            students[method] = student
            checkpoint.save_model(os.path.join(cfg.out, f"student_{method}.pt"), student, cfg.model, model_kwargs, data_info,
                                  {"role": f"student fine-tuned with {label}", "seed": seed, "test_accuracy": acc})

    # ---- evaluation --------------------------------------------------------------------------------
    evaluated = {"teacher": ("Teacher", teacher), "decomposed": ("Tucker, no fine-tuning", student0)}
    evaluated.update({m: (f"Tucker + {RECIPES[m][0]}", s) for m, s in students.items()})
    rows, reports = {}, []
    t0 = time.perf_counter()
    for key, (label, model) in evaluated.items():
        model.eval()
        rep = robustness_report(
            model, test_loader, eps=list(cfg.eps), pgd_steps=cfg.pgd_steps, clamp=test_set.clamp_range,
            std=test_set.std, device=device, seed=cfg.seed, name=label,
        )
        reports.append(rep)
        lat = cost.latency(model, (cfg.latency_batch, *in_shape[1:]), repeats=cfg.latency_repeats, device=device)
        rows[key] = {
            "label": label,
            "parameters": cost.parameters(model),
            "macs": cost.macs(model, in_shape, device=device),
            "latency": lat,
            "clean_accuracy": rep.clean,
            "robustness": rep.to_dict(),
        }
        _log(f"{label:<24} clean {100 * rep.clean:6.2f}%  " + "  ".join(
            f"eps {e * 255:g}/255: FGSM {100 * f:5.1f}% PGD {100 * p:5.1f}%" for e, f, p in zip(rep.eps, rep.fgsm, rep.pgd) if e > 0))
    # Runs 2..R of each method: robustness only (the spread of the CE vs KD comparison over seeds).
    repeats = {}
    for method in cfg.methods:
        runs = [(cfg.seed, rows[method]["robustness"])]
        for seed, model in extra_runs[method]:
            rep = robustness_report(
                model, test_loader, eps=list(cfg.eps), pgd_steps=cfg.pgd_steps, clamp=test_set.clamp_range,
                std=test_set.std, device=device, seed=cfg.seed, name=f"{RECIPES[method][0]} seed {seed}",
            )
            runs.append((seed, rep.to_dict()))
        repeats[method] = [{"seed": seed, **rob} for seed, rob in runs]
    timings["evaluate_s"] = time.perf_counter() - t0
    plot_reports(reports, os.path.join(cfg.out, "robustness.png"),
                 title=f"{dataset} {size}x{size}: accuracy under L-inf attacks (seed {cfg.seed})",
                 colors=[common.colour("teacher"), "black"] + [common.colour(m) for m in students])
    _plot_curves(history, os.path.join(cfg.out, "training_curves.png"), cfg.seed)
    timings["total_s"] = time.perf_counter() - start

    results = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
        "data": {"name": dataset, "train": len(train_set), "test": len(test_set), "image_size": size,
                 "mean": train_set.mean, "std": train_set.std},
        "feature_layers": layers,
        "methods": {m: RECIPES[m][1] for m in cfg.methods},
        "decomposition": _report_to_dict(dec_report),
        "models": rows,
        "history": history,
        "repeats": repeats,
        "timings_s": timings,
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "device": str(device), "platform": platform.platform(),
        },
    }
    if write_report:
        common.write_report(cfg.out, render_report(results), results)
        _log(f"\nwrote {cfg.out}/report.md, results.json, training_curves.png, robustness.png, *.pt "
             f"(total {timings['total_s']:.0f}s)")
    results["_teacher"] = teacher
    return results


def _plot_curves(history: dict, path: str, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, hist in history.items():
        label = "Teacher" if key == "teacher" else f"Tucker + {RECIPES[key][0]}"
        colour = common.colour(key)  # the same colour per method in every plot
        epochs = [r["epoch"] + 1 for r in hist]
        # The cross-entropy term alone is comparable across methods; the weighted totals are not (KD's
        # term is T^2-scaled), so the loss panel shows CE where the run has it and says so.
        ce = [r.get("loss/ce") for r in hist]
        if all(v is not None for v in ce):
            ax_loss.plot(epochs, ce, "-o", color=colour, ms=3, label=f"{label} (CE)")
        else:
            ax_loss.plot(epochs, [r["loss"] for r in hist], "--o", color=colour, ms=3, label=f"{label} (total)")
        if all("eval_accuracy" in r for r in hist):
            ax_acc.plot(epochs, [100 * r["eval_accuracy"] for r in hist], "-o", color=colour, ms=3, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss: CE term (solid) or\nweighted total incl. T²·KD (dashed)")
    ax_loss.set_yscale("log")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Training (seed {seed}): teacher from scratch, students fine-tuned from the Tucker-decomposed "
                 "teacher", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _data_phrase(data: dict) -> str:
    size = data["image_size"]
    if data["name"] == "digits":
        return f"scikit-learn's digits ({data['train']} train / {data['test']} test images, {size}x{size}, fixed split)"
    return f"{data['name']} ({data['train']} train / {data['test']} test images, {size}x{size})"


def _eps_label(e: float) -> str:
    return f"{round(e * 255)}/255" if abs(e * 255 - round(e * 255)) < 1e-6 else f"{e:.3g}"


def _repeats_section(results: dict, eps: list[float]) -> list[str]:
    """Mean ± sample std over the fine-tuning seeds, and the paired (same seed) difference to CE."""
    reps = results.get("repeats") or {}
    n = min((len(v) for v in reps.values()), default=0)
    if n < 2:
        return []
    seeds = [r["seed"] for r in next(iter(reps.values()))]

    def pgd_at(run, e):
        return dict(zip(run["eps"], run["pgd"]))[e]

    lines = [
        "",
        f"## Over {n} fine-tuning seeds ({', '.join(map(str, seeds))}; same teacher and decomposition)",
        "",
        "Accuracy in %, mean ± sample standard deviation over the seeds; *vs CE* is the paired difference "
        "(same seed, so the same data order) to the CE student, in points.",
        "",
        "| student | clean | " + " | ".join(f"PGD {_eps_label(e)}" for e in eps) + " | clean vs CE | "
        + " | ".join(f"PGD {_eps_label(e)} vs CE" for e in eps) + " |",
        "|---" * (2 + 2 * len(eps)) + "|---|",
    ]
    ce = reps.get("ce")
    for method, runs in reps.items():
        cells = [common.fmt_mean_std([100 * r["clean"] for r in runs], scale=1.0)]
        cells += [common.fmt_mean_std([100 * pgd_at(r, e) for r in runs], scale=1.0) for e in eps]
        if ce is not None and method != "ce":
            cells.append(common.fmt_mean_std([100 * (r["clean"] - c["clean"]) for r, c in zip(runs, ce)], scale=1.0))
            cells += [common.fmt_mean_std([100 * (pgd_at(r, e) - pgd_at(c, e)) for r, c in zip(runs, ce)], scale=1.0)
                      for e in eps]
        else:
            cells += ["—"] * (1 + len(eps))
        lines.append(f"| Tucker + {RECIPES[method][0]} | " + " | ".join(cells) + " |")
    return lines


def render_report(results: dict, shift: int = 0) -> str:
    """The protocol's report in markdown; ``shift`` adds that many levels to every heading (and drops the
    title line, for a section of the demo tour)."""
    text = _render_report(results)
    if not shift:
        return text
    lines = text.splitlines()[1:]  # the title becomes the section heading
    return "\n".join(("#" * shift + line) if line.startswith("#") else line for line in lines)


def _render_report(results: dict) -> str:
    cfg = results["config"]
    rows = results["models"]
    eps = [e for e in cfg["eps"] if e > 0]
    lat_batch = cfg["latency_batch"]
    teacher = rows["teacher"]
    lines = [
        "# KD fine-tuning of a Tucker-decomposed CNN and its adversarial robustness",
        "",
        "Protocol of Sadhukhan et al., ICIP 2020 (teacher -> Tucker-2 decomposed student -> fine-tuning by CE vs KD, "
        "then FGSM/PGD robustness). The paper's data, models and numbers are not public; this is the same protocol on "
        f"{_data_phrase(results['data'])}.",
        "",
        f"- Teacher: `{cfg['model']}` at width {cfg['width']:g}, {cfg['teacher_epochs']} epochs, SGD lr {cfg['teacher_lr']:g}, cosine.",
        f"- Student: the teacher with its 3x3 convolutions Tucker-2 decomposed (`kdfast.decompose`, ranks `{cfg['ranks']}`), "
        f"fine-tuned {cfg['student_epochs']} epochs, SGD lr {cfg['student_lr']:g}, cosine, seed {cfg['seed']} for every method.",
        f"- Fine-tuning losses: " + "; ".join(f"**{RECIPES[m][0]}**: {d}" for m, d in results["methods"].items()) + ".",
        f"- Attacks: white-box, untargeted, L-inf, on the {results['data']['test']} test images; eps in pixel units "
        f"(images in [0, 1] before normalisation); FGSM, and PGD with {cfg['pgd_steps']} steps, step 2.5 eps / steps, random start.",
        f"- Latency: median of {cfg['latency_repeats']} timed inference forwards of a batch of {lat_batch} on "
        f"{results['environment']['device']} ({results['environment']['threads']} CPU threads).",
        "",
        "## Results",
        "",
        "| model | params | MACs / image | latency (ms, batch " + str(lat_batch) + ") | clean acc (%) | "
        + " | ".join(f"FGSM {_eps_label(e)} (%)" for e in eps) + " | "
        + " | ".join(f"PGD {_eps_label(e)} (%)" for e in eps) + " |",
        "|---" * (4 + 2 * len(eps)) + "|---|",
    ]
    for key, row in rows.items():
        rob = row["robustness"]
        by_eps = {e: (f, p) for e, f, p in zip(rob["eps"], rob["fgsm"], rob["pgd"])}
        lat = row["latency"]
        lines.append(
            f"| {row['label']} | {row['parameters']:,} ({row['parameters'] / teacher['parameters']:.2f}x) | "
            f"{row['macs']:,} ({row['macs'] / teacher['macs']:.2f}x) | {lat['median_ms']:.2f} (IQR {lat['iqr_ms']:.2f}) | "
            f"{100 * row['clean_accuracy']:.2f} | "
            + " | ".join(f"{100 * by_eps[e][0]:.2f}" for e in eps) + " | "
            + " | ".join(f"{100 * by_eps[e][1]:.2f}" for e in eps) + " |"
        )
    students = [k for k in rows if k not in ("teacher", "decomposed")]
    if students:
        s = rows[students[0]]
        mac_ratio = s["macs"] / teacher["macs"]
        lat_ratio = s["latency"]["median_ms"] / teacher["latency"]["median_ms"]
        lines += [
            "",
            f"MACs count the multiply-accumulates of convolutions and linear layers (`kdfast.cost.macs`); latency is "
            f"measured. The students need {mac_ratio:.2f}x the teacher's MACs and ran in {lat_ratio:.2f}x its time. "
            + ("Fewer MACs did not make them faster here: on maps this small the three thin convolutions of a "
               "Tucker layer are bound by per-call overhead and memory traffic, not arithmetic."
               if lat_ratio >= 0.9 else "")
        ]
    if "ce" in rows and len(students) > 1:
        lines += ["", f"## KD vs CE fine-tuning, seed {cfg['seed']} (percentage points, student minus the CE student)", ""]
        lines.append("| student | clean | " + " | ".join(f"PGD {_eps_label(e)}" for e in eps) + " |")
        lines.append("|---" * (2 + len(eps)) + "|")
        ce = rows["ce"]["robustness"]
        for key in students:
            if key == "ce":
                continue
            rob = rows[key]["robustness"]
            diffs = [100 * (p - q) for e, p, q in zip(rob["eps"], rob["pgd"], ce["pgd"]) if e > 0]
            lines.append(
                f"| {rows[key]['label']} | {100 * (rows[key]['clean_accuracy'] - rows['ce']['clean_accuracy']):+.2f} | "
                + " | ".join(f"{d:+.2f}" for d in diffs) + " |"
            )
        lines += [
            "",
            f"One seed on {results['data']['test']} test images: one image is {100 / results['data']['test']:.2f} points, "
            "and differences of a few points are within seed-to-seed variation (see the seeds section below). The "
            "paper's claim (KD-fine-tuned students are more accurate and more robust than CE-fine-tuned ones) is what "
            "these tables test; it is not assumed.",
        ]
    lines += _repeats_section(results, eps)
    dec = results.get("decomposition") or {}
    lines += ["", "## Decomposition", ""]
    layer_rows = dec.get("layers") if isinstance(dec, dict) else None
    if layer_rows:
        keys = [k for k in ("name", "in_channels", "out_channels", "ranks", "params_before", "params_after", "macs_before", "macs_after")
                if k in layer_rows[0]]
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|---" * len(keys) + "|")
        for lr in layer_rows:
            lines.append("| " + " | ".join(str(lr.get(k)) for k in keys) + " |")
    else:
        lines.append("```\n" + json.dumps(dec, indent=1, default=str)[:4000] + "\n```")
    t = results["timings_s"]
    lines += [
        "",
        "## Files",
        "",
        "- `training_curves.png`: training loss and test accuracy per epoch (teacher and each student).",
        "- `robustness.png`: FGSM (dashed) and PGD (solid) accuracy vs eps for every model.",
        "- `results.json`: everything above plus per-epoch histories and timings.",
        "- `teacher.pt`, `student_decomposed.pt`, `student_<method>.pt`: model checkpoints "
        "(`kdfast robustness --checkpoint FILE`, `kdfast decompose --checkpoint FILE`).",
        "",
        f"Run time {t['total_s']:.0f} s (teacher {t['teacher_train_s']:.0f} s (0: the tour's teacher), decomposition {t['decompose_s']:.1f} s, "
        f"fine-tuning {sum(v for k, v in t.items() if k.startswith('finetune_')):.0f} s, evaluation {t['evaluate_s']:.0f} s); "
        f"torch {results['environment']['torch']}, {results['environment']['cpu_count']} CPUs.",
        "",
    ]
    return "\n".join(lines)


# ====================================================================================== the reproduction
# ``kdfast experiment kd``: Sadhukhan et al.'s claim under the shared protocol of the reproductions
# (kdfast.experiments.protocol). The reference ResNet-26 teacher is trained on the training part of a
# validation split; its Tucker-2 student (EVBMF ranks) is fine-tuned by every recipe over the seeds with
# the same data, schedule and optimiser; KD's temperature and weight are chosen on the validation part; the
# students are attacked (FGSM, PGD-10, PGD-50) and every claim gets a paired 95 % interval and a verdict.

#: The attack radii of the issue, in pixel units of [0, 1] images (the attack uses eps / std per channel).
PIXEL_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
#: The fine-tuning LR schedules (kdfast.distill): cosine stepped once per epoch, or after every step.
FINETUNE_SCHEDULES = ("cosine", "cosine_steps")
#: The KD grid tuned on the validation split (Hinton et al.'s T and the weight of the KD term).
KD_GRID = tuple({"temperature": t, "alpha": a} for t in (2.0, 4.0) for a in (0.5, 0.9))


@dataclass
class ReproductionConfig:
    """Settings of ``kdfast experiment kd`` (:func:`run_reproduction`). :meth:`for_budget` gives the quick
    and full budgets, :meth:`tiny` the seconds-long size of the tests."""

    seeds: tuple = (0, 1, 2)
    methods: tuple = ("ce", "kd", "kd_nst", "kd_at", "kd_fsp")
    teacher: dict = field(default_factory=dict)  # overrides of protocol.REFERENCE_TEACHER
    val_fraction: float = 0.1                     # carved from the training set (protocol.validation_split, seed 0)
    finetune_images: int | None = 10000           # stratified subset of the training part (None: all of it)
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.01                              # SGD 0.9, wd 5e-4, cosine: the same for every recipe
    schedule: str = "cosine_steps"                # "cosine_steps" (stepped per step) or "cosine" (per epoch)
    evals_per_epoch: int = 5                      # test-curve points per epoch (evenly spaced in steps)
    curve_images: int | None = 2000               # stratified test subset of the curve (None: all)
    ranks: str | float = "evbmf"
    rank_options: dict = field(default_factory=dict)  # EVBMF's weaken / min_rank / align (kdfast.decompose)
    kd_grid: tuple = KD_GRID
    fsp_grid: tuple = (1e-4, 1e-3)                # FSP weights tried on the validation split (tune_fsp)
    eps: tuple = PIXEL_EPS
    pgd_steps: tuple = (10, 50)
    fgsm_images: int | None = 1000                # stratified test subset attacked by FGSM (None: all)
    pgd_images: int | None = 200                  # stratified test subset attacked by PGD (None: all)
    attack_batch: int = 500
    device: str = "cpu"

    @classmethod
    def for_budget(cls, budget: str, **overrides) -> "ReproductionConfig":
        """``"full"``: the issue's protocol sized to about an hour on 2 CPU cores (see docs/reproductions.md);
        ``"quick"``: minutes, a short teacher (3 epochs), 2,000 fine-tuning images, 2 seeds, 2 KD settings,
        FGSM on 300 and PGD on 50 test images."""
        if budget not in common.BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(common.BUDGETS)}, got {budget!r}")
        base = {} if budget == "full" else dict(
            seeds=(0, 1), teacher={"epochs": 3}, finetune_images=2000, epochs=2,
            kd_grid=({"temperature": 4.0, "alpha": 0.5}, {"temperature": 4.0, "alpha": 0.9}),
            fgsm_images=300, pgd_images=50)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny(cls, **overrides) -> "ReproductionConfig":
        """Seconds: a one-epoch ResNet-8 teacher, 2 fine-tuning epochs (per-step cosine, 2 curve points per
        epoch on 100 test images), small attacks (tests)."""
        base = dict(seeds=(0, 1), teacher={"name": "resnet8", "width": 0.5, "epochs": 1}, finetune_images=200,
                    epochs=2, batch_size=32, fgsm_images=60, fsp_grid=(1e-3,), schedule="cosine_steps",
                    evals_per_epoch=2, curve_images=100,
                    kd_grid=({"temperature": 4.0, "alpha": 0.9}, {"temperature": 2.0, "alpha": 0.5}),
                    eps=(2 / 255, 8 / 255), pgd_steps=(2, 3), pgd_images=30, attack_batch=64)
        base.update(overrides)
        return cls(**base)

    def check(self) -> None:
        seeds = list(self.seeds)
        if not seeds or len(set(seeds)) != len(seeds) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                             for s in seeds):
            raise ValueError(f"seeds must be distinct non-negative ints, got {self.seeds!r}")
        unknown = [m for m in self.methods if m not in RECIPES]
        if unknown or "ce" not in self.methods or "kd" not in self.methods:
            raise ValueError(f"methods must include 'ce' and 'kd' and come from {list(RECIPES)}, got {list(self.methods)}")
        if self.schedule not in FINETUNE_SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(FINETUNE_SCHEDULES)}, got {self.schedule!r}")
        if self.curve_images is not None and (isinstance(self.curve_images, bool) or not isinstance(self.curve_images, int)
                                              or self.curve_images < 10):
            raise ValueError(f"curve_images must be None or an int >= 10 (one image per class), got {self.curve_images!r}")
        for name in ("epochs", "batch_size", "attack_batch", "evals_per_epoch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not self.kd_grid or any(set(s) != {"temperature", "alpha"} for s in self.kd_grid):
            raise ValueError(f"kd_grid must be a non-empty list of {{'temperature', 'alpha'}} settings, got {self.kd_grid!r}")
        if not self.fsp_grid or any(not (isinstance(w, (int, float)) and w > 0) for w in self.fsp_grid):
            raise ValueError(f"fsp_grid must be a non-empty list of positive FSP weights, got {self.fsp_grid!r}")
        if not self.eps or any(not (0 < e <= 1) for e in self.eps):
            raise ValueError(f"eps must be pixel-unit radii in (0, 1], got {self.eps!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.pgd_steps):
            raise ValueError(f"pgd_steps must be ints >= 1, got {self.pgd_steps!r}")


# ---------------------------------------------------------------------------------------------- attacks
def normalised_eps(eps: float, std) -> torch.Tensor:
    """A pixel-unit L-inf radius (images in [0, 1]) in the model's normalised input units: ``eps / std``
    per channel, as a (C,) tensor (normalisation x' = (x - mean) / std scales a perturbation by 1 / std)."""
    eps = float(eps)
    if not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps must be finite and >= 0 (pixel units), got {eps!r}")
    std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
    if std_t.numel() == 0 or not bool((std_t > 0).all()):
        raise ValueError(f"std must hold one positive value per channel, got {std!r}")
    return eps / std_t


def _box(x_adv, x0, eps, lo, hi):
    """Projection onto the eps-ball around x0, then onto the valid range (kdfast.attacks' order)."""
    return torch.minimum(torch.maximum(torch.minimum(torch.maximum(x_adv, x0 - eps), x0 + eps), lo), hi)


def pgd_robust(model, x, y, eps, steps: int, clamp, generator=None, robust=None):
    """The images PGD does not fool, as a boolean mask.

    The attack is kdfast.attacks.pgd's (Madry et al., ICLR 2018: uniform random start in the eps-ball,
    ``steps`` signed-gradient steps of 2.5 eps / steps on the cross-entropy, projection), with one change
    that makes it affordable on 10,000 images and only ever lowers the accuracy: an image counts as fooled
    at the first iterate the model misclassifies and leaves the batch there (the final iterate is checked
    too). ``robust``: the images still in play at the start (e.g. those classified correctly; default all).
    ``eps`` and ``clamp`` are in the model's input units (per channel: :func:`normalised_eps`,
    ``dataset.clamp_range``). The random start draws the same numbers as attacks.pgd with the same
    generator, so an image never fooled follows attacks.pgd's iterates."""
    c = x.shape[1]
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
    lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1) for b in clamp)
    step = eps * (2.5 / steps)
    x0 = x.detach()
    noise = torch.rand(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
    x_adv = _box(x0 + (2 * noise - 1) * eps, x0, eps, lo, hi)
    robust = torch.ones(len(y), dtype=torch.bool, device=x.device) if robust is None else robust.clone()
    passes = 0
    with attacks.attack_mode(model), torch.enable_grad():
        for _ in range(steps):
            idx = robust.nonzero().flatten()
            if idx.numel() == 0:
                return robust, passes
            xa = x_adv[idx].requires_grad_(True)
            logits = model(xa)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y[idx], reduction="sum"), xa)
            passes += idx.numel()
            robust[idx[logits.detach().argmax(1) != y[idx]]] = False  # fooled at this iterate
            x_adv[idx] = _box(xa.detach() + step * grad.sign(), x0[idx], eps, lo, hi)
        idx = robust.nonzero().flatten()
        if idx.numel():
            with torch.no_grad():
                robust[idx] = model(x_adv[idx]).argmax(1) == y[idx]
    return robust, passes


def attack_accuracy(model, dataset, *, eps=PIXEL_EPS, fgsm: bool = True, pgd_steps=(10, 50), batch_size: int = 500,
                    seed: int = 0, device="cpu") -> dict:
    """Clean, FGSM and PGD accuracy of ``model`` on every image of ``dataset`` (kdfast.data.ImageDataset:
    normalised images, ``std``, ``clamp_range``). ``eps`` in pixel units of [0, 1] images. An image counts
    as robust only when it is classified correctly clean and after the attack (images misclassified clean
    are not attacked). PGD: :func:`pgd_robust`, random start from a generator seeded with ``seed``.
    ``fgsm_unmoved``: the fraction of images classified correctly that FGSM left unchanged (an input
    gradient of exactly zero: such an image resists every gradient attack by masking, not robustness)."""
    device = torch.device(device)
    model = model.to(device).eval()
    eps_in = [normalised_eps(e, dataset.std).to(device) for e in eps]
    clamp = tuple(b.to(device) for b in dataset.clamp_range)
    gen = torch.Generator(device=device).manual_seed(seed)
    n, clean = len(dataset), 0
    fgsm_ok = [0] * len(eps)
    pgd_ok = {int(s): [0] * len(eps) for s in pgd_steps}
    passes = unmoved = 0
    with common.Timer() as timer:
        for i in range(0, n, batch_size):
            x = dataset.images[i:i + batch_size].to(device)
            y = dataset.labels[i:i + batch_size].to(device)
            with torch.no_grad():
                correct = model(x).argmax(1) == y
            clean += int(correct.sum())
            for j, e in enumerate(eps_in):
                if fgsm:
                    x_f = attacks.fgsm(model, x, y, e, clamp=clamp)
                    with torch.no_grad():
                        fgsm_ok[j] += int((correct & (model(x_f).argmax(1) == y)).sum())
                    passes += len(y)
                    if j == 0:  # a zero input gradient leaves the image where it was: masking, not robustness
                        unmoved += int((correct & (x_f == x).flatten(1).all(1)).sum())
                for steps in pgd_ok:
                    robust, used = pgd_robust(model, x, y, e, steps, clamp, gen, robust=correct)
                    pgd_ok[steps][j] += int(robust.sum())
                    passes += used
    return {"n": n, "eps": list(eps), "clean": clean / n, "fgsm": [c / n for c in fgsm_ok] if fgsm else None,
            "pgd": {str(s): [c / n for c in v] for s, v in pgd_ok.items()}, "seconds": timer.seconds,
            "gradient_passes": passes, "fgsm_unmoved": unmoved / n if fgsm else None}


# ---------------------------------------------------------------------------------------------- fine-tuning
def _finetune(teacher, student0, method: str, kd_setting: dict, seed: int, train_set, eval_set, cfg,
              checkpoint_dir=None) -> dict:
    """One fine-tuning run of ``method`` from the decomposed student: (student or None when the loss
    diverged, history, error message, curve). ``eval_set`` is evaluated ``cfg.evals_per_epoch`` times per
    epoch, at evenly spaced steps, the last at the end: the curve, [(step, accuracy)], kept in
    ``checkpoint_dir/curve.json`` so that a resumed run has the points of before its interruption."""
    from ..distill import seed_everything

    seed_everything(seed)
    student = copy.deepcopy(student0).train().requires_grad_(True)
    layers = feature_layers_for(teacher)
    trainer = build(teacher, student, recipe=method, feature_layers=(layers, layers), **kd_setting,
                    optimizer="sgd", lr=cfg.lr, momentum=0.9, weight_decay=5e-4, schedule=cfg.schedule,
                    epochs=cfg.epochs, device=cfg.device, seed=seed, progress=False,
                    checkpoint_dir=checkpoint_dir, resume=checkpoint_dir is not None)
    error = None
    train_loader = common.loader(train_set, cfg.batch_size, seed=seed)
    # The curve is kept beside the checkpoints, not in the engine's history: a resumed engine keeps one
    # record per whole epoch, and the curve has points inside epochs.
    curve_path = None if checkpoint_dir is None else os.path.join(checkpoint_dir, "curve.json")
    curve = {}
    if curve_path is not None and os.path.isfile(curve_path):
        with open(curve_path, encoding="utf-8") as f:
            curve = {int(k): v for k, v in json.load(f).items()}
    try:
        for stop in _eval_steps(cfg.epochs, len(train_loader), 1 if eval_set is None else cfg.evals_per_epoch):
            trainer.fit(train_loader, max_steps=stop)  # continues where it stopped (or resumes from the checkpoint)
            if eval_set is not None and trainer.step == stop and stop not in curve:
                curve[stop] = common.accuracy(student, eval_set, device=cfg.device)
                if curve_path is not None:
                    protocol.write_atomic(curve_path, {str(k): v for k, v in sorted(curve.items())})
    except FloatingPointError as err:  # a loss that blows up is a result (reported), not a crash
        error = str(err)
    finally:
        trainer.close()
    history = [{k: v for k, v in r.items() if isinstance(v, (int, float, str, bool)) or v is None}
               for r in trainer.history]
    resumed = list(trainer.resumed_from[:2]) if trainer.resumed_from else None
    return {"student": None if error else student.eval(), "history": history, "error": error, "resumed_from": resumed,
            "curve": [(step, curve[step]) for step in sorted(curve)]}


def _eval_steps(epochs: int, steps_per_epoch: int, evals_per_epoch: int) -> list:
    """The steps after which the curve is evaluated: ``evals_per_epoch`` per epoch, evenly spaced, the
    last at the end of the schedule (distinct, increasing)."""
    total, points = epochs * steps_per_epoch, epochs * evals_per_epoch
    return sorted({max(1, round(total * k / points)) for k in range(1, points + 1)})


def _tune(method, settings, teacher, student0, train_set, val_set, cfg, store, base=None) -> dict:
    """The setting of ``settings`` (build options of ``method``, on top of ``base``) whose fine-tuned
    student is most accurate on ``val_set``; seed ``cfg.seeds[0]``, the schedule of every run; a run that
    diverges scores 0. With a ``store`` (protocol.RunStore) finished settings are not retrained."""
    seed = cfg.seeds[0]

    def score(setting):
        key = f"tune-{method}-" + "-".join(f"{k}{v:g}" for k, v in sorted({**(base or {}), **setting}.items())) \
              + f"-seed{seed}"

        def train():
            with common.Timer() as t:
                out = _finetune(teacher, student0, method, {**(base or {}), **setting}, seed, train_set, None, cfg,
                                None if store is None else store.checkpoint_dir(key))
            acc = 0.0 if out["student"] is None else common.accuracy(out["student"], val_set, device=cfg.device)
            return {"setting": setting, "val_accuracy": acc, "error": out["error"], "train_s": t.seconds}

        record = train() if store is None else store.run(key, train)
        return record["val_accuracy"]

    with common.Timer() as t:
        out = protocol.tune_on_validation(list(settings), score)
    return {**out, "method": method, "seed": seed, "scored_on": "validation", "n_validation": len(val_set),
            "seconds": t.seconds}


def tune_kd(teacher, student0, train_set, val_set, cfg, store=None) -> dict:
    """KD's (temperature, alpha) chosen on the validation split, never the test set: each setting of
    ``cfg.kd_grid`` fine-tunes the student with KD and is scored by its accuracy on ``val_set``
    (:func:`kdfast.experiments.protocol.tune_on_validation`)."""
    return _tune("kd", cfg.kd_grid, teacher, student0, train_set, val_set, cfg, store)


def tune_fsp(teacher, student0, train_set, val_set, cfg, kd_setting: dict, store=None) -> dict:
    """The weight of the FSP term of KD+FSP (with the tuned KD term) chosen on the validation split from
    ``cfg.fsp_grid``. FSP's own weight, 1 on kdfast's sum-over-entries form (Yim et al.), made the loss
    non-finite in the first epoch on the Tucker ResNet-26 student (the quick run), and RepDistiller
    averages over the Gram entries instead (a factor C_i * C_i+1 = 512 to 2,048 smaller here)."""
    return _tune("kd_fsp", [{"fsp_weight": w} for w in cfg.fsp_grid], teacher, student0, train_set, val_set, cfg,
                 store, base=kd_setting)


def tuned_recipes(methods, kd_setting: dict, fsp_tuning: dict | None) -> dict:
    """{recipe: description} with the weights the reproduction used: KD's tuned T and alpha, the papers'
    NST and AT weights, FSP's tuned weight (RECIPES describes the defaults of ``kdfast.methods.kd``)."""
    t, a = kd_setting["temperature"], kd_setting["alpha"]
    kd = f"{a:g} T^2 KL(T={t:g}) + {1 - a:.2g} CE (kdfast.losses.KDLoss, T and weight tuned on validation)"
    fsp = None if not fsp_tuning else fsp_tuning["best"]["fsp_weight"]
    described = {
        **{m: description for m, (_, description) in RECIPES.items()},  # CE, NST and AT keep their defaults
        "kd": f"Hinton KD from the teacher: {kd}",
        "kd_fsp": f"KD + {fsp:g} x FSP (Yim et al., CVPR 2017: the flow matrices of consecutive stage outputs "
                  "summed over their entries; weight tuned on validation) (kdfast.losses.FSPLoss)"
                  if fsp is not None else RECIPES["kd_fsp"][1],
    }
    return {m: described[m] for m in methods}


# ---------------------------------------------------------------------------------------------- claims
def _metrics(cfg) -> list:
    """(key, label) of every accuracy a claim is tested on: clean, FGSM and PGD-k at each eps."""
    out = [("clean", "clean")]
    out += [(f"fgsm@{_eps_label(e)}", f"FGSM {_eps_label(e)}") for e in cfg["eps"]]
    out += [(f"pgd{s}@{_eps_label(e)}", f"PGD-{s} {_eps_label(e)}") for s in cfg["pgd_steps"] for e in cfg["eps"]]
    return out


def _metric_values(record: dict, cfg: dict) -> dict:
    """A run's accuracies by metric key (None when the run diverged)."""
    att = record.get("attack")
    if not att:
        return {k: None for k, _ in _metrics(cfg)}
    out = {"clean": record["clean"]}
    for j, e in enumerate(cfg["eps"]):
        out[f"fgsm@{_eps_label(e)}"] = att["fgsm"][j]
        for s in cfg["pgd_steps"]:
            out[f"pgd{s}@{_eps_label(e)}"] = att["pgd"][str(s)][j]
    return out


def claims(runs: dict, cfg: dict) -> list:
    """The claims and their verdicts: KD beats CE, and each KD + feature recipe beats KD, on every metric
    (paired by seed; :func:`kdfast.experiments.protocol.claim`). A claim with a diverged run is
    inconclusive and says so."""
    pairs = [("kd", "ce")] + [(m, "kd") for m in cfg["methods"] if m not in ("ce", "kd")]
    out = []
    for a, b in pairs:
        if a not in runs or b not in runs:
            continue
        va = [_metric_values(r, cfg) for r in runs[a]]
        vb = [_metric_values(r, cfg) for r in runs[b]]
        for key, label in _metrics(cfg):
            xa, xb = [v[key] for v in va], [v[key] for v in vb]
            row = {"a": a, "b": b, "metric": key, "label": label}
            if any(v is None for v in xa + xb):
                row.update(diffs=None, mean=None, std=None, ci95=[None, None], verdict=protocol.INCONCLUSIVE,
                           note=f"{sum(v is None for v in xa + xb)} run(s) diverged")
            else:
                row.update(protocol.claim(xa, xb))
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- the run
def _check_same_protocol(store, cfg, dataset, train_set, test_set) -> None:
    """Finished runs are reused only by the same protocol: the first call records its settings in the
    store; a later call with other settings (seeds and device aside) in the same directory stops."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("seeds", "device")}
    settings = {**settings, "dataset": dataset, "train": len(train_set), "test": len(test_set)}
    differ = protocol.settings_differ(store.path("protocol"), settings)
    if differ:
        raise ValueError(f"{os.path.dirname(store.root)} holds runs of another kd protocol (settings that differ: "
                         f"{', '.join(differ)}); use another --out directory, or delete that one to start afresh")


def run_reproduction(cfg: ReproductionConfig, out_dir: str, data, run_record: dict | None = None) -> dict:
    """The protocol of ``kdfast experiment kd``; ``data`` = (dataset name, data root, train set, test set).
    Finished runs are kept in ``<out_dir>/runs`` and the engine's checkpoints in ``<out_dir>/checkpoints``:
    the same call after an interruption continues where it stopped. Writes report.md, results.json,
    robustness.png, training_curves.png and the first seed's students (kdfast.model_file)."""
    from .. import cost
    from .. import model_file

    cfg.check()
    dataset, root, full_train, test_set = data
    os.makedirs(out_dir, exist_ok=True)
    store = protocol.RunStore(out_dir)
    _check_same_protocol(store, cfg, dataset, full_train, test_set)
    timings = {}

    train_part, val_set = protocol.validation_split(full_train, cfg.val_fraction, seed=0)
    teacher, model_kwargs, teacher_acc, teacher_info = protocol.reference_teacher(
        dataset, train_part, test_set, device=cfg.device, **cfg.teacher)
    teacher_recipe = {**protocol.REFERENCE_TEACHER, **cfg.teacher}
    start = time.perf_counter()  # the experiment's time, the teacher's apart
    how = "cached" if teacher_info["cached"] else f"trained in {teacher_info['train_s']:.0f}s"
    _log(f"teacher {teacher_recipe['name']}: test accuracy {100 * teacher_acc:.2f}% ({how})")
    finetune_set = common.stratified_images(train_part, cfg.finetune_images)
    pgd_set = common.stratified_images(test_set, cfg.pgd_images)
    fgsm_set = common.stratified_images(test_set, cfg.fgsm_images)
    # the per-evaluation curve; the reported clean accuracy is on every test image
    curve_set = common.stratified_images(test_set, cfg.curve_images)

    with common.Timer() as t:
        size = train_part.image_size
        in_shape = (1, train_part.in_channels, size, size)
        student0, dec_report = _decompose(teacher, cfg.ranks, in_shape[1:], **cfg.rank_options)
        student0 = student0.to(cfg.device).eval()
        dec_acc = common.accuracy(student0, test_set, device=cfg.device)
    timings["decompose_s"] = t.seconds
    models_info = {
        "teacher": {"parameters": cost.parameters(teacher), "macs": cost.macs(teacher, in_shape), "test_accuracy": teacher_acc},
        "decomposed": {"parameters": cost.parameters(student0), "macs": cost.macs(student0, in_shape),
                       "test_accuracy": dec_acc},
    }
    _log(f"Tucker-2 ({cfg.ranks} ranks): {models_info['decomposed']['parameters']:,} parameters "
         f"({models_info['teacher']['parameters']:,} in the teacher), test accuracy before fine-tuning {100 * dec_acc:.2f}%")

    tuning = tune_kd(teacher, student0, finetune_set, val_set, cfg, store)
    kd_setting = tuning["best"]
    timings["tuning_s"] = tuning["seconds"]
    _log(f"KD tuned on {len(val_set)} validation images: T = {kd_setting['temperature']:g}, "
         f"alpha = {kd_setting['alpha']:g}")
    options = {m: dict(kd_setting) for m in cfg.methods}
    fsp_tuning = None
    if "kd_fsp" in cfg.methods:
        fsp_tuning = tune_fsp(teacher, student0, finetune_set, val_set, cfg, kd_setting, store)
        options["kd_fsp"].update(fsp_tuning["best"])
        timings["tuning_s"] += fsp_tuning["seconds"]
        _log(f"FSP weight tuned on the validation images: {fsp_tuning['best']['fsp_weight']:g}")

    data_info = common.data_info(full_train, test_set, dataset, root)
    steps_per_epoch = math.ceil(len(finetune_set) / cfg.batch_size)  # common.loader keeps the last partial batch
    runs = {m: [] for m in cfg.methods}
    for seed in cfg.seeds:  # seed by seed: an interrupted experiment has whole seeds done first
        for method in cfg.methods:
            key = f"{method}-seed{seed}"

            def train_and_attack(method=method, seed=seed, key=key):
                with common.Timer() as t_train:
                    out = _finetune(teacher, student0, method, options[method], seed, finetune_set, curve_set, cfg,
                                    store.checkpoint_dir(key))
                record = {"method": method, "seed": seed, "kd_setting": kd_setting, "options": options[method],
                          "history": out["history"],
                          "curve": [acc for _, acc in out["curve"]],
                          "curve_epochs": [step / steps_per_epoch for step, _ in out["curve"]], "error": out["error"],
                          "resumed_from": out["resumed_from"], "train_s": t_train.seconds, "attack": None}
                student = out["student"]
                if student is None:
                    _log(f"{RECIPES[method][0]} seed {seed}: diverged ({out['error']})")
                    return record
                record["clean"] = common.accuracy(student, test_set, device=cfg.device)
                fg = attack_accuracy(student, fgsm_set, eps=cfg.eps, pgd_steps=(), batch_size=cfg.attack_batch,
                                     seed=seed, device=cfg.device)
                pg = attack_accuracy(student, pgd_set, eps=cfg.eps, fgsm=False, pgd_steps=cfg.pgd_steps,
                                     batch_size=cfg.attack_batch, seed=seed, device=cfg.device)
                record["attack"] = {"fgsm": fg["fgsm"], "n_fgsm": fg["n"], "pgd": pg["pgd"], "n_pgd": pg["n"],
                                    "clean_pgd_images": pg["clean"], "clean_fgsm_images": fg["clean"],
                                    "fgsm_unmoved": fg["fgsm_unmoved"],
                                    "fgsm_s": fg["seconds"], "pgd_s": pg["seconds"],
                                    "gradient_passes": fg["gradient_passes"] + pg["gradient_passes"]}
                if seed == cfg.seeds[0]:
                    model_file.save_model(os.path.join(out_dir, f"student_{method}.pt"), student,
                                          teacher_recipe["name"], model_kwargs, data_info,
                                          {"role": f"Tucker-2 student fine-tuned with {RECIPES[method][0]}",
                                           "seed": seed, "test_accuracy": record["clean"]})
                _log(f"{RECIPES[method][0]:<7} seed {seed}: clean {100 * record['clean']:.2f}%, "
                     f"train {t_train.seconds:.0f}s, attacks {fg['seconds'] + pg['seconds']:.0f}s")
                return record

            runs[method].append(store.run(key, train_and_attack))
    timings["total_s_excluding_teacher"] = time.perf_counter() - start
    cfg_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    cfg_dict["kd_grid"] = [dict(s) for s in cfg.kd_grid]
    cfg_dict["fsp_grid"] = list(cfg.fsp_grid)
    results = {
        "config": cfg_dict,
        "data": {**data_info, "train_part": len(train_part), "validation": len(val_set), "finetune": len(finetune_set),
                 "fgsm_images": len(fgsm_set), "pgd_images": len(pgd_set), "curve_images": len(curve_set)},
        "teacher": {"recipe": teacher_recipe, "test_accuracy": teacher_acc, **teacher_info},
        "decomposition": _report_to_dict(dec_report),
        "models": models_info,
        "methods": tuned_recipes(cfg.methods, tuning["best"], fsp_tuning),
        "tuning": tuning,
        "tuning_fsp": fsp_tuning,
        "runs": runs,
        "claims": claims(runs, cfg_dict),
        "convergence": {m: [protocol.convergence([v for v in r["curve"] if v is not None]) for r in rs]
                        for m, rs in runs.items()},
        "timings_s": timings,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(cfg.device)},
    }
    if run_record is not None:
        results["run"] = run_record
    plot_robustness(results, os.path.join(out_dir, "robustness.png"))
    plot_curves(results, os.path.join(out_dir, "training_curves.png"))
    common.write_report(out_dir, render_reproduction(results), results)
    _log(f"\nwrote {out_dir}/report.md, results.json, robustness.png, training_curves.png "
         f"({timings['total_s_excluding_teacher']:.0f}s without the teacher)")
    return results


# ---------------------------------------------------------------------------------------------- figures
def _interval(values):
    """(mean, half-width of the 95 % t-interval) of ``values`` in points (0 half-width for one value)."""
    m, _ = common.mean_std(values)
    lo, hi = common.confidence_interval(values)
    return m, (0.0 if lo != lo else (hi - lo) / 2)


def plot_robustness(results: dict, path: str) -> None:
    """Accuracy vs eps per fine-tuning loss (mean over seeds, 95 % interval bars): FGSM and each PGD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    panels = [("fgsm", "FGSM")] + [(f"pgd{s}", f"PGD-{s}") for s in cfg["pgd_steps"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True)
    xs = [0] + [255 * e for e in cfg["eps"]]
    for ax, (kind, title) in zip(axes, panels):
        for method, runs in results["runs"].items():
            done = [r for r in runs if r.get("attack")]
            if not done:
                continue
            # eps = 0: clean accuracy on the images this attack ran on
            values = [{**_metric_values(r, cfg), "clean": r["attack"].get(
                "clean_fgsm_images" if kind == "fgsm" else "clean_pgd_images", r["clean"])} for r in done]
            keys = ["clean"] + [f"{kind}@{_eps_label(e)}" for e in cfg["eps"]]
            stats = [_interval([100 * v[k] for v in values]) for k in keys]
            ax.errorbar(xs, [m for m, _ in stats], yerr=[h for _, h in stats], fmt="-o", ms=3, capsize=3,
                        color=common.colour(method), label=f"Tucker + {RECIPES[method][0]}")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(xs)
        ax.set_xticklabels(["0"] + [f"{x:g}/255" for x in xs[1:]])
        ax.set_xlabel("eps (L-inf, pixel units)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean and 95 % interval over seeds")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{results['data']['name']}: Tucker-2 students by fine-tuning loss "
                 f"({len(cfg['seeds'])} seeds; FGSM on {results['data']['fgsm_images']}, "
                 f"PGD on {results['data']['pgd_images']} test images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(results: dict, path: str) -> None:
    """Test accuracy over fine-tuning (at every curve evaluation), every run (one colour per recipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    dec = 100 * results["models"]["decomposed"]["test_accuracy"]
    for method, runs in results["runs"].items():
        for i, r in enumerate(runs):
            # results of before the sub-epoch curve have one point per epoch and no curve_epochs
            when = r.get("curve_epochs") or list(range(1, len(r["curve"]) + 1))
            points = [(x, 100 * v) for x, v in zip(when, r["curve"]) if v is not None]
            ax.plot([0] + [x for x, _ in points], [dec] + [v for _, v in points], "-o", ms=2, alpha=0.7,
                    color=common.colour(method), label=f"Tucker + {RECIPES[method][0]}" if i == 0 else None)
    ax.axhline(100 * results["teacher"]["test_accuracy"], color=common.colour("teacher"), ls="--", label="teacher")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("fine-tuning epochs (0: decomposed, before fine-tuning)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Fine-tuning curves, every seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- report
def _ranks_phrase(decomposition: dict) -> str:
    """How many layers got which (r_out, r_in), and how many EVBMF put at rank 0 (raised to 1): a student
    whose layers all sit at rank 1 starts near chance and is trained more than fine-tuned."""
    layers = decomposition.get("layers") or []
    if not layers:
        return ""
    counts = {}
    for layer in layers:
        counts[tuple(layer["ranks"])] = counts.get(tuple(layer["ranks"]), 0) + 1
    zero = sum(1 for layer in layers if 0 in tuple(layer.get("evbmf_ranks") or ()))
    text = "Ranks (r_out, r_in): " + ", ".join(f"{r} in {n}" for r, n in sorted(counts.items())) + " layer(s)."
    if zero:
        text += (f" EVBMF found no rank above its noise level in {zero} of {len(layers)} layers (rank 0, raised to "
                 "1): the student starts far from the teacher and its fine-tuning is closer to training a small "
                 "network than to recovering a decomposed one.")
    return text


def _tied(tuning: dict) -> bool:
    """Did another setting of the grid score exactly as well as the chosen one?"""
    scores = [r["val_accuracy"] for r in tuning["table"]]
    return scores.count(max(scores)) > 1


def _schedule_phrase(cfg: dict) -> str:
    if cfg.get("schedule", "cosine") == "cosine_steps":
        return "cosine over every step, to 0 at the end"
    return "cosine stepped once per epoch"


def _curve_phrase(cfg: dict, data: dict) -> str:
    """How the convergence curve was measured (results of before the sub-epoch curve: once per epoch on
    the whole test set)."""
    per_epoch = cfg.get("evals_per_epoch", 1)
    images = data.get("curve_images", data["test"])
    when = "after every epoch" if per_epoch == 1 else f"{per_epoch} times per epoch (evenly spaced steps)"
    on = f"all {images} test images" if images == data["test"] else f"a stratified subset of {images} test images"
    return f"The curve: test accuracy {when} on {on}."


def render_reproduction(results: dict) -> str:
    """report.md of ``kdfast experiment kd``."""
    cfg, data, teacher = results["config"], results["data"], results["teacher"]
    runs, tuning, t = results["runs"], results["tuning"], results["timings_s"]
    metrics = _metrics(cfg)
    dec, tea = results["models"]["decomposed"], results["models"]["teacher"]
    best = tuning["best"]
    lines = [
        f"# Tucker-2 + KD fine-tuning on {data['name']} (Sadhukhan et al., ICIP 2020)",
        "",
        "Claim tested: fine-tuning a Tucker-2-decomposed CNN by knowledge distillation from the undecomposed "
        "teacher beats fine-tuning by cross-entropy, in clean accuracy and under FGSM/PGD attacks. Only the "
        "paper's abstract is available; its data, models and numbers are not, so this is the claim under "
        "kdfast's protocol, not a re-run of the paper's experiments.",
        "",
    ]
    if "run" in results:
        lines += [f"Command: `{results['run']['command']}`", ""]
    lines += [
        "## Protocol",
        "",
        f"- Data: {data['name']} ({data['image_size']}x{data['image_size']}); a class-stratified "
        f"{100 * cfg['val_fraction']:g} % of the {data['train']} training images is the validation split "
        f"({data['validation']} images, seed 0), the other {data['train_part']} the training part; the test set "
        f"({data['test']} images) is used for nothing but the reported accuracies.",
        f"- Teacher: `{teacher['recipe']['name']}` (width {teacher['recipe']['width']:g}), {teacher['recipe']['epochs']} "
        f"epochs of CE on the training part (SGD {teacher['recipe']['lr']:g}, cosine, no augmentation), test accuracy "
        f"**{100 * teacher['test_accuracy']:.2f} %**; "
        + ("cached from an earlier run." if teacher["cached"] else f"trained in {teacher['train_s'] / 60:.1f} min "
           "(not counted in the experiment's time)."),
        f"- Student: the teacher with every 3x3 convolution but the stem Tucker-2 decomposed (`kdfast.decompose`, "
        f"ranks `{cfg['ranks']}`): {dec['parameters']:,} parameters ({dec['parameters'] / tea['parameters']:.2f}x the "
        f"teacher's), {dec['macs']:,} MACs per image ({dec['macs'] / tea['macs']:.2f}x), test accuracy before "
        f"fine-tuning {100 * dec['test_accuracy']:.2f} %. {_ranks_phrase(results['decomposition'])}",
        f"- Fine-tuning, identical for every recipe: {cfg['epochs']} epochs over {data['finetune']} images "
        f"(a stratified subset of the training part, seed 0), batch {cfg['batch_size']}, SGD lr {cfg['lr']:g} "
        f"(momentum 0.9, weight decay 5e-4, {_schedule_phrase(cfg)}), no augmentation; run *s* of every recipe uses "
        f"seed *s* (same initialisation, same data order). {_curve_phrase(cfg, data)} Recipes: "
        + "; ".join(f"**{RECIPES[m][0]}** {d}" for m, d in results["methods"].items()) + ".",
        f"- KD's temperature and weight (also the KD part of the KD + feature recipes) chosen on the validation "
        f"split over {len(cfg['kd_grid'])} settings (seed {tuning['seed']}): T = {best['temperature']:g}, "
        f"alpha = {best['alpha']:g} (the weight of the T²-scaled KD term; CE has 1 - alpha); the feature terms keep "
        "their papers' weights (NST 50, AT beta 1000) except FSP's, tuned below.",
        f"- Attacks: white-box, untargeted, L-inf; eps {', '.join(_eps_label(e) for e in cfg['eps'])} in pixel units "
        "of [0, 1] images (the attack uses eps / std per channel in the normalised input). FGSM on "
        f"{data['fgsm_images']} test images; PGD with {' and '.join(str(s) for s in cfg['pgd_steps'])} steps (random "
        f"start, step 2.5 eps / steps) on {data['pgd_images']} test images (a stratified subset, the same for every "
        "student). An image counts as robust only if it is classified correctly clean and at every PGD iterate "
        "(an image leaves the attack at the first iterate that fools the model: a slightly stronger attack than "
        "PGD's final iterate alone, and much cheaper).",
        f"- Statistics: {len(cfg['seeds'])} seeds ({', '.join(map(str, cfg['seeds']))}); paired (same seed) "
        "differences with their 95 % t-interval; a claim is *reproduced* when the interval lies above 0, *not "
        "reproduced* below, *inconclusive* when it straddles 0.",
        "",
        "## KD tuning (validation split)",
        "",
        "| T | alpha | validation accuracy (%) |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['setting']['temperature']:g} | {r['setting']['alpha']:g} | {100 * r['val_accuracy']:.2f} |"
              for r in tuning["table"]]
    fsp = results.get("tuning_fsp")
    if fsp:
        lines += ["", "FSP's own weight (1 on the sum over Gram entries, Yim et al.) made the KD+FSP loss non-finite in "
                  "the first epoch on this student, so its weight is chosen on the validation split too (with the "
                  f"tuned KD term; a run that diverges scores 0): **{fsp['best']['fsp_weight']:g}**"
                  + (" (a tie: the first of the grid is kept)" if _tied(fsp) else "") + ".", "",
                  "| FSP weight | validation accuracy (%) |", "|---:|---:|"]
        lines += [f"| {r['setting']['fsp_weight']:g} | {100 * r['val_accuracy']:.2f} |" for r in fsp["table"]]
    lines += ["", "## Accuracy (%), mean ± std over seeds", "",
              f"Clean and FGSM on {data['fgsm_images']} test images (clean: all {data['test']}), PGD on "
              f"{data['pgd_images']}; *clean (PGD images)* is the clean accuracy on the images PGD attacked.", "",
              "| student | " + " | ".join(label for _, label in metrics) + " | clean (PGD images) |",
              "|---" * (2 + len(metrics)) + "|"]
    for method, rs in runs.items():
        values = [{**_metric_values(r, cfg), "clean_pgd": (r.get("attack") or {}).get("clean_pgd_images")}
                  for r in rs]
        cells = []
        for key, _ in metrics:
            vs = [v[key] for v in values if v[key] is not None]
            cells.append(common.fmt_mean_std(vs) if vs else "diverged")
        vs = [v["clean_pgd"] for v in values if v["clean_pgd"] is not None]
        cells.append(common.fmt_mean_std(vs) if vs else "diverged")
        lines.append(f"| Tucker + {RECIPES[method][0]} | " + " | ".join(cells) + " |")
    unmoved = [r["attack"].get("fgsm_unmoved") or 0.0 for rs in runs.values() for r in rs if r.get("attack")]
    if unmoved:
        lines += ["", f"FGSM left {100 * max(unmoved):.2f} % of the test images at most (per student) where they "
                  "were: an input gradient of exactly zero. "
                  + ("Such images resist every gradient attack by masking, so the attacked accuracies above "
                     "overstate robustness." if max(unmoved) > 0.01 else "Gradient masking of this kind is negligible.")]
    lines += ["", "## Claims", "",
              "Paired difference A − B in points (mean and 95 % interval over the seeds).", "",
              "| claim | metric | A − B | 95 % interval | verdict |", "|---|---|---:|---|---|"]
    for c in results["claims"]:
        mean = "—" if c["mean"] is None else f"{100 * c['mean']:+.2f}"
        verdict = c["verdict"] + (f" ({c['note']})" if c.get("note") else "")
        lines.append(f"| {RECIPES[c['a']][0]} beats {RECIPES[c['b']][0]} | {c['label']} | {mean} | "
                     f"{common.fmt_ci(c['ci95'])} | {verdict} |")
    # A claim stands on converged students only when every run of both its recipes converged.
    converged = {m: protocol.every_run_converged([[v for v in r["curve"] if v is not None] for r in rs])
                 for m, rs in runs.items()}
    lines += ["", "Summary:", ""]
    for a, b in dict.fromkeys((c["a"], c["b"]) for c in results["claims"]):
        rows = [c for c in results["claims"] if (c["a"], c["b"]) == (a, b)]
        counts = {v: sum(c["verdict"] == v for c in rows) for v in
                  (protocol.REPRODUCED, protocol.NOT_REPRODUCED, protocol.INCONCLUSIVE)}
        clean = next(c["verdict"] for c in rows if c["metric"] == "clean")
        lines.append(f"- {RECIPES[a][0]} beats {RECIPES[b][0]}: clean accuracy **{clean}**; over all {len(rows)} "
                     f"metrics {counts[protocol.REPRODUCED]} reproduced, {counts[protocol.NOT_REPRODUCED]} not "
                     f"reproduced, {counts[protocol.INCONCLUSIVE]} inconclusive; "
                     + ("every run of both converged." if converged.get(a) and converged.get(b) else
                        "**budget too small** for a conclusion: not every run of "
                        + " and ".join(RECIPES[m][0] for m in (b, a) if not converged.get(m)) + " converged."))
    if any(c["verdict"] == protocol.INCONCLUSIVE for c in results["claims"]) and len(cfg["seeds"]) < 5:
        lines.append("- Some intervals straddle 0: more seeds (`--seeds 0,1,2,3,4`; finished runs are kept) "
                     "may decide them.")
    curves = {f"Tucker + {RECIPES[m][0]}": [[v for v in r["curve"] if v is not None] for r in rs]
              for m, rs in runs.items()}
    rows, every = protocol.tail_table(curves)
    lines += ["", "## Convergence", "",
              "A run converged when its test accuracy moved by less than 1 point over the last 20 % of its "
              "schedule (`training_curves.png`).", "",
              "| student | runs converged | largest move in the last 20 % |", "|---|---|---|", *rows, ""]
    unconverged = [RECIPES[m][0] for m, ok in converged.items() if not ok]
    if every:
        lines.append("Every run converged.")
    elif len(unconverged) == len(converged):
        lines.append("**Budget too small**: not every run converged, so the verdicts above describe students that "
                     "were still changing; do not read them as the paper's claim tested to convergence.")
    else:
        lines.append(f"**Budget too small** for the claims that involve {', '.join(unconverged)}: not every run of "
                     "those recipes converged, so their verdicts describe students that were still changing. Every "
                     f"run of {', '.join(RECIPES[m][0] for m, ok in converged.items() if ok)} converged: the claims "
                     "between those stand on converged students.")
    att = [r["attack"] for rs in runs.values() for r in rs if r.get("attack")]
    train_s = [r["train_s"] for rs in runs.values() for r in rs]
    lines += ["", "## Cost", ""]
    lines.append(f"- Experiment without the teacher: {t['total_s_excluding_teacher'] / 60:.1f} min in this process "
                 f"(runs finished by an earlier, interrupted process count 0 here); decomposition "
                 f"{t['decompose_s']:.0f} s, KD tuning {t['tuning_s']:.0f} s.")
    if train_s:
        lines.append(f"- Fine-tuning: {sum(train_s) / len(train_s):.0f} s per run on average.")
    if att:
        per_pass = sum(a["fgsm_s"] + a["pgd_s"] for a in att) / max(1, sum(a["gradient_passes"] for a in att))
        full = per_pass * data["test"] * max(cfg["pgd_steps"]) * len(cfg["eps"])
        lines.append(f"- Attacks: {sum(a['fgsm_s'] + a['pgd_s'] for a in att) / len(att):.0f} s per student; "
                     f"{1000 * per_pass:.2f} ms per image and gradient step, so PGD-{max(cfg['pgd_steps'])} "
                     f"without early exit on all {data['test']} test images at {len(cfg['eps'])} radii would take "
                     f"about {full / 60:.0f} min per student.")
    lines += ["", f"torch {results['environment']['torch']}, {results['environment']['threads']} threads, "
              f"{results['environment']['cpu_count']} CPUs, device {results['environment']['device']}.", "",
              "## Files", "",
              "- `robustness.png`: accuracy vs eps per fine-tuning loss (mean and 95 % interval over seeds).",
              "- `training_curves.png`: test accuracy during fine-tuning (the curve), every run.",
              "- `results.json`: everything above, per run (histories, curves, attacks) and the command.",
              "- `runs/`, `checkpoints/`: finished runs and the engine's checkpoints (re-running the command "
              "continues an interrupted experiment).",
              "- `student_<recipe>.pt`: the first seed's students (`kdfast robustness --checkpoint FILE`).", ""]
    return "\n".join(lines)


def run(out_dir: str, *, dataset: str = "digits", data_root=None, budget: str = "quick", seeds=None,
        device: str = "cpu", config: ReproductionConfig | None = None) -> dict:
    """``kdfast experiment kd``: Sadhukhan et al.'s claim on ``dataset`` (:func:`run_reproduction`).
    ``budget`` "full": :meth:`ReproductionConfig.for_budget` ("full"; seeds 0, 1, 2 by default); "quick":
    minutes, on datasets other than digits a 10,000 / 2,000-image subset. ``config`` replaces the budget's
    settings (tests). Re-running the same command continues an interrupted experiment."""
    seeds = common.check_run(dataset, budget, seeds, device)
    cfg = config if config is not None else ReproductionConfig.for_budget(budget)
    cfg = dataclasses.replace(cfg, device=device, **({} if seeds is None else {"seeds": tuple(seeds)}))
    subsets = common.quick_subsets(dataset, budget)
    train_set, test_set = common.load_data(dataset, data_root, train_subset=subsets[0], test_subset=subsets[1])
    record = common.run_record(NAME, out_dir, dataset=dataset, data_root=data_root, budget=budget,
                               seeds=list(cfg.seeds) if seeds is not None else None, device=device)
    return run_reproduction(cfg, out_dir, (dataset, data_root, train_set, test_set), run_record=record)


def demo_section(ctx: common.DemoContext, cfg: DemoConfig | None = None) -> common.DemoSection:
    """The tour's first section: the protocol on the tour's teacher (no teacher training here). ``cfg``
    (the tour's, with its epochs/ranks/latency knobs) defaults to the demo size for ``ctx``."""
    if cfg is None:
        cfg = (DemoConfig.tiny_config if ctx.tiny else DemoConfig)(
            out=ctx.out_dir, device=str(ctx.device), seed=ctx.seeds[0], repeats=len(ctx.seeds),
            model=ctx.teacher_name, width=ctx.model_kwargs.get("width_mult", 1.0))
    with common.Timer() as timer:
        results = run_protocol(cfg, teacher=ctx.teacher, write_report=False)
    results.pop("_teacher")
    body = render_report(results, shift=1)
    return common.DemoSection(name=NAME, title=TITLE, markdown=body, results=results,
                              figures=["training_curves.png", "robustness.png"], time_s=timer.seconds)
