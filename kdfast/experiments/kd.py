"""The protocol of the first source paper: Sadhukhan et al., "Knowledge Distillation Inspired Fine-Tuning of Tucker Decomposed CNNs and
Adversarial Robustness Analysis", ICIP 2020.

The paper decomposes a trained CNN (the teacher) with Tucker-2, then fine-tunes the decomposed network (the
student) by distilling from the undecomposed teacher instead of by cross-entropy alone, and compares accuracy
and adversarial robustness. Its datasets, models and numbers are not public; :func:`run_protocol` runs the
same protocol on the digits data embedded in scikit-learn (kdfast.data, 1,347 train / 450 test, 16x16) in the
tour, or on any dataset of :data:`kdfast.experiments.common.DATASETS` (:func:`run`):

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

Writes report.md, results.json, training_curves.png, robustness.png and model checkpoints
(kdfast.model_file format: `kdfast robustness --checkpoint` and `kdfast decompose --checkpoint` read them).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..methods.kd import PAPER, RECIPES, TITLE, build, feature_layers_for
from . import common

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


def _decompose(model: nn.Module, ranks, input_shape):
    """kdfast.decompose with its default selection: every 3x3 conv but the stem, at least 16
    channels in and out. Returns (student, report); the teacher is left untouched (deep copy)."""
    import kdfast

    return kdfast.decompose(model, ranks=ranks, input_shape=tuple(input_shape))


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


def run(out_dir: str, *, dataset: str = "digits", data_root=None, budget: str = "quick", seeds=None,
        device: str = "cpu") -> dict:
    """``kdfast experiment kd``: the whole protocol (teacher, decomposition, the five recipes over the seeds,
    robustness) on ``dataset``. ``budget`` "full": 12 teacher and 6 student epochs, seeds 0, 1, 2;
    "quick": 8 and 4 epochs, seeds 0, 1 (and on datasets other than digits a 10,000 / 2,000-image subset).
    ``seeds`` must be consecutive (the protocol fine-tunes with seeds
    S, S + 1, ...). Writes report.md, results.json, training_curves.png, robustness.png and checkpoints."""
    seeds = common.check_run(dataset, budget, seeds, device)
    quick = budget == "quick"
    if seeds is None:
        seeds = [0, 1] if quick else [0, 1, 2]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"the kd protocol fine-tunes with consecutive seeds S, S+1, ...; got {seeds}")
    # the experiment adds KD+FSP (Yim et al., CVPR 2017) to the tour's four recipes
    cfg = DemoConfig(out=out_dir, device=device, seed=seeds[0], repeats=len(seeds),
                     methods=("ce", "kd", "kd_nst", "kd_at", "kd_fsp"))
    if quick:
        cfg.teacher_epochs, cfg.student_epochs = 8, 4
    data = None
    if dataset != "digits":
        subsets = common.quick_subsets(dataset, budget)
        train_set, test_set = common.load_data(dataset, data_root, train_subset=subsets[0], test_subset=subsets[1])
        data = (dataset, data_root, train_set, test_set)
    results = run_protocol(cfg, data=data, write_report=False)
    results.pop("_teacher")
    results["run"] = common.run_record(NAME, out_dir, dataset=dataset, data_root=data_root, budget=budget,
                                       seeds=seeds, device=device)
    common.write_report(out_dir, render_report(results), results)
    _log(f"\nwrote {out_dir}/report.md, results.json, training_curves.png, robustness.png, *.pt "
         f"(total {results['timings_s']['total_s']:.0f}s)")
    return results


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
