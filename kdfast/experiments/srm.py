"""The SRM experiment (Tran, Gabbouj, Iosifidis, 2021): sparse representation matching against KD and CE
across architectures (teacher vgg8 -> student resnet8 at half width), with the ablation of the matching
targets (global / local / global-local), paired differences with 95 % confidence intervals, and pictures of
the teacher's pixel-level codeword labels. The method itself: :mod:`kdfast.methods.srm`.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..distill import FeatureTap
from ..losses import KDLoss
from ..methods.srm import OFFICIAL_PHASES, PAPER, TITLE, PhasedDistiller, build, lr_milestones
from . import common

NAME = "srm"

# Teacher vgg8 (the tour's teacher: VGG blocks, max pooling) -> student resnet8 at half width
# (residual blocks, strided convs): a different architecture, as the paper's claim is robustness to
# architectural differences. Layers matched by size: vgg block0/1/2 (16x16, 8x8, 4x4 on 16x16 digits)
# with resnet layer1/2/3.
STUDENT = {"name": "resnet8", "width": 0.5}
TEACHER = {"name": "vgg8", "width": 0.25}
SEEDS = (0, 1, 2)


def _config(quick: bool, tiny: bool = False) -> dict:
    if tiny:
        return {"teacher_epochs": 1, "dictionary_epochs": 1, "init_epochs": 1, "kd_epochs": 1, "train_subset": 96,
                "test_subset": 64, "seeds": (0,), "batch_size": 32}
    if quick:
        return {"teacher_epochs": 8, "dictionary_epochs": 3, "init_epochs": 4, "kd_epochs": 8, "train_subset": None,
                "test_subset": None, "seeds": SEEDS, "batch_size": 64}
    return {"teacher_epochs": 15, "dictionary_epochs": 8, "init_epochs": 10, "kd_epochs": 20, "train_subset": None,
            "test_subset": None, "seeds": SEEDS, "batch_size": 64}


def _train_baseline(kind, teacher, student, train_loader, test_loader, cfg, seed, device):
    """CE or KD (stage C's loss from scratch) with stage C's optimiser and epochs."""
    epochs = cfg["kd_epochs"]
    losses = {"ce": nn.CrossEntropyLoss()} if kind == "ce" else {"kd": KDLoss(cfg["temperature"], alpha=cfg["alpha"])}
    phases = lr_milestones(epochs, OFFICIAL_PHASES["kd"])  # stage C's official phases, as SRM's own stage C
    engine = PhasedDistiller(None if kind == "ce" else teacher, student, losses, optimizer="adam", lr=cfg["lr"],
                             weight_decay=cfg["weight_decay"], schedule="step", milestones=phases,
                             restart_epochs=phases, epochs=epochs, device=device, seed=seed, progress=False)
    try:
        return engine.fit(train_loader, eval_loader=test_loader)
    finally:
        engine.close()


def _train_srm(teacher, student, train_loader, test_loader, cfg, seed, device, target, input_shape):
    run = build(teacher, student, input_shape=input_shape, target=target, dictionary_epochs=cfg["dictionary_epochs"],
                init_epochs=cfg["init_epochs"], kd_epochs=cfg["kd_epochs"], lr=cfg["lr"],
                weight_decay=cfg["weight_decay"], alpha=cfg["alpha"], temperature=cfg["temperature"], device=device,
                seed=seed, progress=False)
    try:
        history = run.fit(train_loader, eval_loader=test_loader)
    finally:
        run.close()
    return run, history


def _final_accuracy(history) -> float:
    return float(history[-1]["eval_accuracy"])


def _curve(history, key):
    return [float(r[key]) for r in history if key in r]


def _pixel_label_figure(teacher, run, images, path, device):
    """Input images and the teacher's pixel-level codeword labels (argmax codeword per pixel) at each
    matched layer, one colour per codeword."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [p["teacher"] for p in run.pairs]
    with FeatureTap(teacher, layers, detach=True) as tap, torch.no_grad():
        teacher.eval()
        teacher(images.to(device))
        labels_per_layer = [d.labels(f.float())[1].cpu() for d, f in zip(run.dictionaries.layers, tap.features)]
    n, cols = images.shape[0], 1 + len(layers)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    for i in range(n):
        img = images[i].cpu()
        axes[i][0].imshow((img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy(), cmap="gray")
        for j, (pair, lab) in enumerate(zip(run.pairs, labels_per_layer)):
            k_total = run.dictionaries.layers[j].dictionary.shape[1]
            axes[i][j + 1].imshow(lab[i].numpy(), cmap="nipy_spectral", vmin=0, vmax=k_total - 1, interpolation="nearest")
            if i == 0:
                axes[i][j + 1].set_title(f"{pair['teacher']} ({pair['size'][0]}x{pair['size'][1]}, K={k_total})",
                                         fontsize=7)
            axes[i][j + 1].set_xlabel(f"{int(lab[i].unique().numel())} codewords", fontsize=6)
        if i == 0:
            axes[i][0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Teacher pixel-level labels: argmax codeword per pixel", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {pair["teacher"]: [int(lab[i].unique().numel()) for i in range(n)]
            for pair, lab in zip(run.pairs, labels_per_layer)}


def _curves_figure(curves, path):
    """One panel per SRM stage (mean over seeds): dictionary MSE, matching loss, test accuracy in the
    KD stage next to KD and CE trained for the same epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(rows):
        rows = [r for r in rows if r]
        if not rows:
            return []
        length = min(len(r) for r in rows)
        return [sum(r[i] for r in rows) / len(rows) for i in range(length)]

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(mean(curves["srm"]["dictionaries_loss"]), marker="o", color=common.colour("srm"))
    axes[0].set(title="stage A: dictionaries", xlabel="epoch", ylabel="sum of MSE(x, C s_hat)")
    for target, style in (("global-local", "-"), ("global", "--"), ("local", ":")):
        key = "srm" if target == "global-local" else f"srm_{target}"
        if key in curves:
            axes[1].plot(mean(curves[key]["matching_loss"]), linestyle=style, color=common.colour("srm"), label=target)
    axes[1].set(title="stage B: representation matching", xlabel="epoch", ylabel="BCE + CE")
    axes[1].legend(fontsize=7)
    for method, label in (("srm", "SRM (stage C)"), ("kd", "KD"), ("ce", "CE")):
        axes[2].plot(mean(curves[method]["eval_accuracy"]), label=label, color=common.colour(method))
    axes[2].set(title="stage C: KD fine-tuning (test accuracy)", xlabel="epoch", ylabel="accuracy")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _experiment(out_dir, cfg, device, teacher=None, teacher_acc=None, model_kwargs=None, train_set=None,
                test_set=None, figure_prefix=""):
    """The SRM / KD / CE comparison and the target ablation; returns the results dict."""
    from .. import models
    from ..distill import seed_everything

    os.makedirs(out_dir, exist_ok=True)
    if train_set is None:
        train_set, test_set = common.digits(16, cfg["train_subset"], cfg["test_subset"])
    timings = {}
    if teacher is None:
        with common.Timer() as t:
            teacher, model_kwargs, teacher_acc = common.train_teacher(
                train_set, test_set, name=TEACHER["name"], width=TEACHER["width"], epochs=cfg["teacher_epochs"],
                device=device)
        timings["teacher_s"] = t.seconds
    teacher = teacher.to(device)
    input_shape = tuple(train_set[0][0].shape)
    student_kwargs = dict(model_kwargs, width_mult=STUDENT["width"])
    test_loader = common.loader(test_set, 256, shuffle=False)
    methods = ["srm", "srm_global", "srm_local", "kd", "ce"] if cfg.get("ablation", True) else ["srm", "kd", "ce"]
    acc = {m: [] for m in methods}
    curves = {m: {"dictionaries_loss": [], "matching_loss": [], "eval_accuracy": []} for m in methods}
    figure_runs = None
    for seed in cfg["seeds"]:
        train_loader = common.loader(train_set, cfg["batch_size"], seed=seed)
        for method in methods:
            seed_everything(seed)
            student = models.build(STUDENT["name"], **student_kwargs)
            with common.Timer() as t:
                if method.startswith("srm"):
                    target = {"srm": "global-local", "srm_global": "global", "srm_local": "local"}[method]
                    run, history = _train_srm(teacher, student, train_loader, test_loader, cfg, seed, device, target,
                                              input_shape)
                    curves[method]["dictionaries_loss"].append(_curve(history["dictionaries"], "loss"))
                    curves[method]["matching_loss"].append(_curve(history["matching"], "loss"))
                    final = history["kd"]
                    if method == "srm" and figure_runs is None:
                        figure_runs = run
                else:
                    final = _train_baseline(method, teacher, student, train_loader, test_loader, cfg, seed, device)
            timings[f"{method}_seed{seed}_s"] = t.seconds
            curves[method]["eval_accuracy"].append(_curve(final, "eval_accuracy"))
            acc[method].append(_final_accuracy(final))
    figures = [f"{figure_prefix}srm_curves.png", f"{figure_prefix}srm_pixel_labels.png"]
    _curves_figure(curves, os.path.join(out_dir, figures[0]))
    images = torch.stack([test_set[i][0] for i in range(min(4, len(test_set)))])
    codewords_used = _pixel_label_figure(teacher, figure_runs, images, os.path.join(out_dir, figures[1]), device)
    summary = {m: {"accuracy": acc[m], "mean": common.mean_std(acc[m])[0], "std": common.mean_std(acc[m])[1]}
               for m in methods}
    paired = {}
    for a, b in (("srm", "kd"), ("srm", "ce"), ("kd", "ce"), ("srm_global", "srm"), ("srm_local", "srm")):
        if a in acc and b in acc:
            diffs = common.paired_differences(acc[a], acc[b])
            paired[f"{a}-{b}"] = {"differences": diffs, "mean": common.mean_std(diffs)[0], "std": common.mean_std(diffs)[1],
                                  "ci95": list(common.confidence_interval(diffs))}
    return {
        "teacher": {**TEACHER, "accuracy": teacher_acc}, "student": STUDENT, "config": cfg,
        "pairs": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()} for p in figure_runs.pairs],
        "codewords": [{"teacher_layer": p["teacher"], "K": d.dictionary.shape[1], "k": d.k}
                      for p, d in zip(figure_runs.pairs, figure_runs.dictionaries.layers)],
        "accuracy": summary, "paired_differences": paired, "curves": curves,
        "pixel_label_codewords_used": codewords_used, "timings_s": timings, "figures": figures,
    }


def _render(results, heading="#") -> str:
    h2 = heading + "#"
    acc, paired = results["accuracy"], results["paired_differences"]
    cfg = results["config"]
    names = {"srm": "SRM (global-local)", "srm_global": "SRM, global targets only", "srm_local": "SRM, local targets only",
             "kd": "KD", "ce": "CE"}
    lines = [
        f"{heading} SRM: sparse representation matching on {results.get('data', {}).get('name', 'digits')}", "",
        f"Paper: {PAPER}.", "",
        f"Teacher {results['teacher']['name']} (width {results['teacher']['width']}, test accuracy "
        f"{100 * results['teacher']['accuracy']:.2f}%) -> student {results['student']['name']} (width "
        f"{results['student']['width']}): a different architecture (VGG blocks with max pooling -> residual blocks "
        "with strided convolutions). Layers matched by spatial size: "
        + ", ".join(f"{p['teacher']} -> {p['student']} ({p['size'][0]}x{p['size'][1]})" for p in results["pairs"])
        + "; codewords per layer: " + ", ".join(f"K={c['K']}, k={c['k']}" for c in results["codewords"])
        + " (m = 2, r = 0.02 as the official CIFAR setting).", "",
        f"Epochs: dictionaries {cfg['dictionary_epochs']}, matching {cfg['init_epochs']}, KD {cfg['kd_epochs']}; "
        f"KD and CE baselines: {cfg['kd_epochs']} epochs with the KD stage's optimiser (Adam 1e-3, wd 1e-4, LR / 10 at "
        f"60% and 85%); KD loss {cfg['alpha']} T^2 KL + {1 - cfg['alpha']} CE, T = {cfg['temperature']}. "
        f"Seeds {list(cfg['seeds'])} (same student initialisation per seed across methods). Note SRM gets "
        f"{cfg['init_epochs']} extra epochs of stage B before its KD stage, as in the official protocol.", "",
        f"{h2} Test accuracy (final epoch)", "",
        "| method | accuracy % (mean ± std) | per seed |", "|---|---|---|",
    ]
    for m, r in acc.items():
        lines.append(f"| {names.get(m, m)} | {common.fmt_mean_std(r['accuracy'])} | "
                     + ", ".join(f"{100 * a:.2f}" for a in r["accuracy"]) + " |")
    lines += ["", f"{h2} Paired differences (same seed), accuracy points", "",
              "| pair | mean ± std | 95 % CI (t) | per seed |", "|---|---|---|---|"]
    for key, r in paired.items():
        lines.append(f"| {key} | {common.fmt_mean_std(r['differences'])} | {common.fmt_ci(r.get('ci95', (None, None)))} | "
                     + ", ".join(f"{100 * d:+.2f}" for d in r["differences"]) + " |")
    srm_kd = paired.get("srm-kd")
    n_test = results.get("data", {}).get("test", 450)
    if srm_kd is not None:
        m, s = srm_kd["mean"], srm_kd["std"]
        n = len(srm_kd["differences"])
        verdict = ("SRM is ahead of KD on every seed" if all(d > 0 for d in srm_kd["differences"]) else
                   "SRM is behind KD on every seed" if all(d < 0 for d in srm_kd["differences"]) else
                   "the sign of SRM - KD changes between seeds")
        lines += ["", f"Reading: {verdict} (mean {100 * m:+.2f} points, std {100 * s:.2f}, {n} seeds). "
                  f"With this few seeds and a {n_test}-image test set (one image = {100 / n_test:.2f} points), "
                  "differences of a point or less are within the noise; this is a small-scale check of the method, not a "
                  "reproduction of the paper's CIFAR-100 / ImageNet results."]
    lines += ["", f"{h2} Curves and pixel-level labels", "",
              f"![curves]({results['figures'][0]})", "",
              f"![pixel labels]({results['figures'][1]})", "",
              "Distinct codewords used as pixel labels in the pictured test images: "
              + "; ".join(f"{k}: {v}" for k, v in results["pixel_label_codewords_used"].items()) + ".", ""]
    return "\n".join(lines)


def run(out_dir: str, *, dataset: str = "digits", data_root=None, budget: str = "quick", seeds=None,
        device: str = "cpu") -> dict:
    """``kdfast experiment srm``: teacher vgg8 -> student resnet8 (width 0.5); SRM vs KD vs CE over the seeds
    (default 0, 1, 2) with the target ablation (global / local / global-local). "quick": fewer epochs (and on
    datasets other than digits a 10,000 / 2,000-image subset). The teacher is cached. Writes report.md,
    results.json, srm_curves.png and srm_pixel_labels.png into ``out_dir``."""
    seeds = common.check_run(dataset, budget, seeds, device)
    quick = budget == "quick"
    cfg = {**_config(quick), "lr": 1e-3, "weight_decay": 1e-4, "alpha": 0.5, "temperature": 4.0}
    if seeds is not None:
        cfg["seeds"] = tuple(seeds)
    subsets = common.quick_subsets(dataset, budget)
    train_set, test_set = common.load_data(dataset, data_root, train_subset=cfg["train_subset"] or subsets[0],
                                           test_subset=cfg["test_subset"] or subsets[1])
    with common.Timer() as timer:
        teacher, model_kwargs, teacher_acc, cache = common.cached_teacher(
            dataset, train_set, test_set, name=TEACHER["name"], width=TEACHER["width"], epochs=cfg["teacher_epochs"],
            device=device)
        results = _experiment(out_dir, cfg, device, teacher=teacher, teacher_acc=teacher_acc, model_kwargs=model_kwargs,
                              train_set=train_set, test_set=test_set)
    results["timings_s"]["teacher_s"] = cache["train_s"]
    results["teacher"]["cache"] = cache
    results["data"] = common.data_info(train_set, test_set, dataset, data_root)
    results["time_s"] = timer.seconds
    results["run"] = common.run_record(NAME, out_dir, dataset=dataset, data_root=data_root, budget=budget,
                                       seeds=list(cfg["seeds"]), device=device)
    common.write_report(out_dir, _render(results), results)
    return results


def demo_section(ctx: common.DemoContext) -> common.DemoSection:
    """The tour's SRM section: the tour's teacher -> resnet8 (width 0.5), SRM (global-local) vs KD vs CE over
    ``ctx.seeds``, epochs sized for ``ctx.budget_s`` (no ablation); ``ctx.tiny``: a seconds-long run."""
    cfg = {**_config(quick=True, tiny=ctx.tiny), "lr": 1e-3, "weight_decay": 1e-4, "alpha": 0.5, "temperature": 4.0,
           "seeds": tuple(ctx.seeds), "ablation": False}
    if not ctx.tiny:
        cfg.update(dictionary_epochs=2, init_epochs=2, kd_epochs=4)
    train_set, test_set = ctx.train_set, ctx.test_set
    if ctx.tiny:
        train_set, test_set = common.subset(train_set, cfg["train_subset"]), common.subset(test_set, cfg["test_subset"])
    teacher_acc = common.accuracy(ctx.teacher, test_set, device=ctx.device)
    with common.Timer() as timer:
        results = _experiment(ctx.out_dir, cfg, ctx.device, teacher=ctx.teacher, teacher_acc=teacher_acc,
                              model_kwargs=ctx.model_kwargs, train_set=train_set, test_set=test_set)
    results["teacher"]["name"] = ctx.teacher_name
    results["teacher"]["width"] = ctx.model_kwargs.get("width_mult", 1.0)
    body = _render(results, heading="##").split("\n", 2)[2]  # drop the heading line: the tour adds the title
    return common.DemoSection(name=NAME, title=TITLE, markdown=body, results=common.json_safe(results),
                              figures=results["figures"], time_s=timer.seconds)
