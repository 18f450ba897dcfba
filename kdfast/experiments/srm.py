"""The SRM experiment (Tran, Gabbouj, Iosifidis, 2021; official code viebboy/SRM): does sparse representation
matching train a more accurate student than KD and AT from the same teacher, across architectures?

:func:`run` (``kdfast experiment srm``) runs the protocol of issue 22 (:data:`PROTOCOL`): a class-stratified
validation split carved from the training set; a teacher (vgg8, full width at ``--budget full``) trained
once on the rest and cached; a student of another architecture (resnet8); the official alpha / T grid
(:data:`OFFICIAL_GRID`) for KD and for SRM's KD stage, chosen on the validation split; CE, KD, AT and SRM
over the seeds, and KD for as many epochs as SRM's student trains (kdfast's control for SRM's extra
stage); every run keeping its best state on the validation split as the official trainers do;
paired differences with 95 % intervals and a verdict per claim; test accuracy per epoch and the
convergence test. Each run is stored and checkpointed under the output folder, so the same command
resumes an interrupted experiment.

What is official and what is kdfast's choice: the LR phases, the optimiser re-created at each phase, the
selection rules (per stage, at phase ends), m = 2, r = 0.02, k = int(D m r), the alpha / T grid and the
global-local targets are the official code's; the validation split (10 % of the training set, stratified;
the official code reads a separate CIFAR-100 validation folder), tuning at the first seed only, the
teacher and student architectures, the students' training subset, the epoch counts (the official
stage proportions scaled down to fit 60 minutes on 2 CPU cores) and the longer KD control are kdfast's.

:func:`demo_section` is the tour's short SRM section (SRM / KD / CE on the tour's teacher, no tuning).
The method itself: :mod:`kdfast.methods.srm`.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import types

import torch
from torch import nn

from ..distill import FeatureTap
from ..losses import KDLoss
from ..methods.srm import (OFFICIAL_PHASES, PAPER, TITLE, DictionarySet, PhasedDistiller, Selection, SparseDictionary,
                           build, lr_milestones, match_layers, num_codewords, sparsity)
from . import common, protocol

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


# ================================================================================ the protocol (issue 22)
# ``kdfast experiment srm``: SRM against a KD tuned on a validation split, AT and CE, as the official code
# selects models (viebboy/SRM ``cifar100/code/Utility.py``, ``exp_configurations.py``).

#: The official alpha / T grid of KD and of SRM's KD stage (``kd_values`` and ``srmkd_values`` in
#: viebboy/SRM ``cifar100/code/exp_configurations.py``): alpha weights T^2 KL, 1 - alpha weights CE.
OFFICIAL_GRID = tuple({"alpha": a, "temperature": t} for a in (0.25, 0.5, 0.75) for t in (2.0, 4.0, 8.0))

#: The protocol per budget. Teacher vgg8 at full width (64/128/256 channels at the three matched
#: resolutions: k = int(D m r) = 2, 5, 10 active codes with the official m = 2, r = 0.02; the official
#: DenseNet-121 teacher's 128/256/1024 channels give 5, 10, 40) -> student resnet8 (residual blocks, strided
#: convolutions: another architecture). The teacher trains on the whole training part of the validation
#: split (at most 30 minutes, reported apart); the students on a class-stratified subset of it
#: (``student_images``) so that the whole comparison fits 60 minutes on 2 CPU cores (kdfast's choice; the
#: epoch counts are the official stage proportions 100 : 160 : 200 scaled down the same way). The test
#: curve of every epoch (convergence, figures) is read on a class-stratified ``curve_images`` subset of
#: the test set, the same for every run; the reported accuracy of a run is on every test image.
PROTOCOL = {
    "full": {"teacher": {"name": "vgg8", "width": 1.0, "epochs": 12, "lr": 0.05, "seed": 0},
             "student": {"name": "resnet8", "width": 1.0}, "student_images": 6000, "curve_images": 2000,
             "val_fraction": 0.1,
             "dictionary_epochs": 5, "init_epochs": 8, "epochs": 15, "batch_size": 64, "lr": 1e-3,
             "weight_decay": 1e-4, "at_beta": 1000.0, "grid": OFFICIAL_GRID, "seeds": SEEDS},
    "quick": {"teacher": {"name": "vgg8", "width": 0.5, "epochs": 3, "lr": 0.05, "seed": 0},
              "student": {"name": "resnet8", "width": 0.5}, "student_images": 3000, "curve_images": None,
              "val_fraction": 0.1,
              "dictionary_epochs": 2, "init_epochs": 3, "epochs": 6, "batch_size": 64, "lr": 1e-3,
              "weight_decay": 1e-4, "at_beta": 1000.0,
              "grid": ({"alpha": 0.5, "temperature": 4.0}, {"alpha": 0.75, "temperature": 4.0}), "seeds": SEEDS},
}
#: "kdlong" is kdfast's control, not the paper's: KD at the tuned alpha, T trained for as many epochs as SRM's
#: student gets (stage B's matching epochs + its KD stage), so that SRM's gain over KD can be told apart from
#: its extra epochs of updates.
METHODS = ("ce", "kd", "kdlong", "at", "srm")
LABELS = {"ce": "CE", "kd": "KD (tuned)", "kdlong": "KD (tuned), as many epochs as SRM", "at": "AT", "srm": "SRM"}


def _protocol_config(budget: str) -> dict:
    return copy.deepcopy(PROTOCOL[budget])


def active_codes(channels: int, multiplier: float = 2.0, ratio: float = 0.02) -> int:
    """The official number of active codes per pixel, lambda = int(D m r) (at least 1): viebboy/SRM
    ``cifar100/code/DenseNet.py`` passes ``int(in_dim * sparsity_multiplier * codeword_multiplier)``."""
    return sparsity(channels, multiplier, ratio)


def _setting_key(setting) -> str:
    return f"a{setting['alpha']:g}-T{setting['temperature']:g}"


def _phased(teacher, student, losses, cfg, seed, device, val_loader, feature_layers=None, checkpoint_dir=None,
            cache=False, epochs=None):
    """An engine with SRM's stage-C optimiser (Adam, official phases, re-created at each) and the official
    selection (best validation accuracy at each phase's end): the schedule every baseline shares, over
    ``epochs`` (default: the KD stage's)."""
    epochs = cfg["epochs"] if epochs is None else epochs
    phases = lr_milestones(epochs, OFFICIAL_PHASES["kd"])
    return PhasedDistiller(teacher, student, losses, feature_layers=feature_layers, optimizer="adam", lr=cfg["lr"],
                           weight_decay=cfg["weight_decay"], schedule="step", milestones=phases,
                           restart_epochs=phases, selection=Selection("val_accuracy", val_loader, phases + [epochs]),
                           epochs=epochs, device=device, seed=seed, progress=False, cache_teacher_logits=cache,
                           checkpoint_dir=checkpoint_dir, resume=checkpoint_dir is not None)


def _record(method, seed, setting, student, history, engine_selected, loaders, device, seconds, **extra):
    """What a finished run leaves in the store: accuracies of the selected state (validation, every test
    image), the per-epoch curve (on the curve's test images) and its last point."""
    return {"method": method, "seed": seed, "setting": setting,
            "val_accuracy": common.accuracy(student, loaders["val"].dataset, device=device),
            "test_accuracy": common.accuracy(student, loaders["test"].dataset, device=device),
            "last_epoch_curve_accuracy": float(history[-1]["eval_accuracy"]),
            "curve": _curve(history, "eval_accuracy"), "selected": engine_selected, "time_s": seconds, **extra}


def _baseline_run(method, setting, seed, ctx, store):
    """CE, KD (``setting``: alpha, T), KD for SRM's student's epochs ("kdlong": stage B's + the KD stage's) or
    AT (beta * attention loss + CE, RepDistiller's beta = 1000) from scratch, with the KD stage's optimiser
    and selection; stored under its key."""
    from .. import models
    from ..distill import seed_everything
    from ..losses import ATLoss

    key = f"{method}-{_setting_key(setting)}-seed{seed}" if setting is not None else f"{method}-seed{seed}"

    def train():
        cfg, device = ctx["cfg"], ctx["device"]
        seed_everything(seed)
        student = models.build(cfg["student"]["name"], **ctx["student_kwargs"])
        layers = None
        if method == "ce":
            losses = {"ce": nn.CrossEntropyLoss()}
        elif method in ("kd", "kdlong"):
            losses = {"kd": KDLoss(setting["temperature"], alpha=setting["alpha"])}
        else:
            losses = {"ce": nn.CrossEntropyLoss(), "at": ATLoss(beta=cfg["at_beta"])}
            layers = {"at": ([p["student"] for p in ctx["pairs"]], [p["teacher"] for p in ctx["pairs"]])}
        engine = _phased(None if method == "ce" else ctx["teacher"], student, losses, cfg, seed, device,
                         ctx["loaders"]["val"], feature_layers=layers, checkpoint_dir=store.checkpoint_dir(key),
                         cache=method in ("kd", "kdlong"),
                         epochs=cfg["init_epochs"] + cfg["epochs"] if method == "kdlong" else None)
        with common.Timer() as t:
            try:
                history = engine.fit(ctx["loaders"]["train"], eval_loader=ctx["loaders"]["curve"])
            finally:
                engine.close()
        return _record(method, seed, setting, student, history, engine.selected, ctx["loaders"], device, t.seconds)

    return store.run(key, train)


def _srm_run(setting, seed, ctx, store, share_from=None):
    """SRM (global-local targets, official m, r) with stage C at ``setting``; stages A and B are shared
    between the settings of one seed as the official code reuses its initialised student: their finished
    checkpoints are copied from the run ``share_from`` and resumed (loaded, not retrained)."""
    from .. import models
    from ..distill import seed_everything

    key = f"srm-{_setting_key(setting)}-seed{seed}"

    def train():
        cfg, device = ctx["cfg"], ctx["device"]
        folder = store.checkpoint_dir(key)
        if share_from is not None:
            source = store.checkpoint_dir(share_from)
            for stage in ("dictionaries", "matching"):
                if os.path.isfile(os.path.join(source, stage, "last.pt")) and not os.path.isdir(os.path.join(folder, stage)):
                    shutil.copytree(os.path.join(source, stage), os.path.join(folder, stage))
        seed_everything(seed)
        student = models.build(cfg["student"]["name"], **ctx["student_kwargs"])
        run = build(ctx["teacher"], student, input_shape=ctx["input_shape"], target="global-local",
                    dictionary_epochs=cfg["dictionary_epochs"], init_epochs=cfg["init_epochs"], kd_epochs=cfg["epochs"],
                    lr=cfg["lr"], weight_decay=cfg["weight_decay"], alpha=setting["alpha"],
                    temperature=setting["temperature"], val_loader=ctx["loaders"]["val"], cache_teacher_logits=True,
                    device=device, seed=seed, progress=False, checkpoint_dir=folder, resume=True)
        with common.Timer() as t:
            try:
                history = run.fit(ctx["loaders"]["train"], eval_loader=ctx["loaders"]["curve"])
            finally:
                run.close()
        return _record("srm", seed, setting, student, history["kd"], run.selected, ctx["loaders"], device, t.seconds,
                       dictionaries_loss=_curve(history["dictionaries"], "loss"),
                       matching_loss=_curve(history["matching"], "loss"),
                       stage_time_s={k: sum(r.get("time_s", 0.0) for r in v) for k, v in history.items()})

    return store.run(key, train)


def _tune(method, ctx, store, seed):
    """Every setting of the grid at ``seed``, the best by validation accuracy (protocol.tune_on_validation,
    never the test set); returns (tuning table, runs by setting key)."""
    runs = {}
    first = None
    for setting in ctx["cfg"]["grid"]:
        if method == "kd":
            runs[_setting_key(setting)] = _baseline_run("kd", setting, seed, ctx, store)
        else:
            runs[_setting_key(setting)] = _srm_run(setting, seed, ctx, store, share_from=first)
            first = first or f"srm-{_setting_key(setting)}-seed{seed}"
    tuned = protocol.tune_on_validation(ctx["cfg"]["grid"], lambda s: runs[_setting_key(s)]["val_accuracy"])
    return tuned, runs


def _distinct_runs(runs, tuned_runs):
    """Every run of the experiment once (the tuned setting's run at the first seed is in both)."""
    seen = {}
    for group in [*runs.values(), *[list(r.values()) for r in tuned_runs.values()]]:
        for r in group:
            seen[(r["method"], r["seed"], json.dumps(r["setting"], sort_keys=True))] = r
    return list(seen.values())


def _load_dictionaries(store, key, pairs):
    """The dictionaries a stored SRM run kept (its stage-A checkpoint), for the pixel-label figure; None when
    the checkpoint is gone."""
    from ..distill import load_checkpoint

    path = os.path.join(store.checkpoint_dir(key), "dictionaries", "last.pt")
    if not os.path.isfile(path):
        return None
    ckpt = load_checkpoint(path)
    state = (ckpt["selection"]["state"]["auxiliaries"]["dictionaries"] if ckpt.get("selection")
             else ckpt["auxiliaries"]["dictionaries"]["module"])
    dictionaries = DictionarySet([SparseDictionary(p["teacher_channels"], num_codewords(p["teacher_channels"]),
                                                   active_codes(p["teacher_channels"])) for p in pairs])
    dictionaries.load_state_dict(state)
    return dictionaries


def _protocol_figures(out_dir, results, runs_by_method):
    """protocol_curves.png (test accuracy per epoch, mean over seeds, per method; SRM's stage A and B
    losses) and protocol_grid.png (validation accuracy over the alpha / T grid, KD and SRM)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(rows):
        rows = [r for r in rows if r]
        n = min((len(r) for r in rows), default=0)
        return [sum(r[i] for r in rows) / len(rows) for i in range(n)]

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    for m in METHODS:
        curve = mean([r["curve"] for r in runs_by_method[m]])
        start = results["protocol"]["init_epochs"] if m == "srm" else 0  # SRM's curve is its KD stage's
        axes[0].plot(range(start + 1, start + len(curve) + 1), [100 * v for v in curve], label=LABELS[m],
                     color=common.colour("kd" if m == "kdlong" else m), linestyle="--" if m == "kdlong" else "-")
    axes[0].set(title="test accuracy per epoch (mean over seeds)",
                xlabel="student epochs (SRM: KD stage, after matching)", ylabel="%")
    axes[0].legend(fontsize=7)
    srm_runs = runs_by_method["srm"]
    axes[1].plot(mean([r["dictionaries_loss"] for r in srm_runs]), marker="o", color=common.colour("srm"))
    axes[1].set(title="SRM stage A: dictionaries", xlabel="epoch", ylabel="sum of MSE(x, C s_hat)")
    axes[2].plot(mean([r["matching_loss"] for r in srm_runs]), marker="o", color=common.colour("srm"))
    axes[2].set(title="SRM stage B: matching", xlabel="epoch", ylabel="BCE + CE")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "protocol_curves.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), squeeze=False)
    for ax, method in zip(axes[0], ("kd", "srm")):
        table = results["tuning"][method]["table"]
        labels = [f"a={r['setting']['alpha']:g}\nT={r['setting']['temperature']:g}" for r in table]
        ax.bar(range(len(table)), [100 * r["val_accuracy"] for r in table], color=common.colour(method))
        ax.set_xticks(range(len(table)))
        ax.set_xticklabels(labels, fontsize=6)
        low = min(100 * r["val_accuracy"] for r in table)
        ax.set_ylim(max(0.0, low - 2), None)
        ax.set(title=f"{LABELS[method]}: validation accuracy per setting", ylabel="%")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "protocol_grid.png"), dpi=120)
    plt.close(fig)
    return ["protocol_curves.png", "protocol_grid.png"]


def run_protocol(out_dir, cfg, train_set, test_set, *, dataset, device="cpu") -> dict:
    """The protocol on ``train_set`` / ``test_set``: validation split, cached teacher, KD and SRM tuned on
    the validation split at the first seed, then CE, KD, KD for SRM's epochs, AT, SRM over every seed (each
    run stored in a :class:`~kdfast.experiments.protocol.RunStore` under ``out_dir`` and checkpointed: a
    re-run resumes), paired claims, convergence, figures. Returns the results dict (the report is written by :func:`run`)."""
    from .. import models
    from ..distill import IndexedDataset

    os.makedirs(out_dir, exist_ok=True)
    store = protocol.RunStore(out_dir)
    train_part, val_set = protocol.validation_split(train_set, cfg["val_fraction"], seed=0)
    tcfg = cfg["teacher"]
    teacher, model_kwargs, teacher_acc, cache = common.cached_teacher(
        dataset, train_part, test_set, name=tcfg["name"], width=tcfg["width"], epochs=tcfg["epochs"], lr=tcfg["lr"],
        seed=tcfg["seed"], device=device)
    teacher = teacher.to(device)
    if not cache["cached"]:  # the teacher's training time, kept for the report of a resumed experiment
        store.put("teacher", {**cache, "accuracy": teacher_acc})
    trained = store.get("teacher")
    if trained is not None and trained.get("path") == cache["path"]:
        cache = {**cache, "train_s": trained["train_s"]}
    students_train = common.stratified_images(train_part, cfg["student_images"])
    curve_set = common.stratified_images(test_set, cfg.get("curve_images"))
    student_kwargs = dict(model_kwargs, width_mult=cfg["student"]["width"])
    input_shape = tuple(train_set[0][0].shape)
    pairs = match_layers(teacher, models.build(cfg["student"]["name"], **student_kwargs), input_shape)
    ctx = {"cfg": cfg, "device": device, "teacher": teacher, "student_kwargs": student_kwargs, "pairs": pairs,
           "input_shape": input_shape,
           "loaders": {"train": common.loader(IndexedDataset(students_train), cfg["batch_size"], seed=0),
                       "val": common.loader(val_set, 256, shuffle=False),
                       "test": common.loader(test_set, 256, shuffle=False),
                       "curve": common.loader(curve_set, 256, shuffle=False)}}
    seeds = list(cfg["seeds"])
    with common.Timer() as timer:
        tuning, tuned_runs = {}, {}
        for method in ("kd", "srm"):
            tuning[method], tuned_runs[method] = _tune(method, ctx, store, seeds[0])
        runs = {m: [] for m in METHODS}
        for seed in seeds:
            runs["ce"].append(_baseline_run("ce", None, seed, ctx, store))
            runs["at"].append(_baseline_run("at", None, seed, ctx, store))
            for method in ("kd", "srm"):
                best = tuning[method]["best"]
                if seed == seeds[0]:
                    runs[method].append(tuned_runs[method][_setting_key(best)])
                elif method == "kd":
                    runs[method].append(_baseline_run("kd", best, seed, ctx, store))
                else:
                    runs[method].append(_srm_run(best, seed, ctx, store))
            runs["kdlong"].append(_baseline_run("kdlong", tuning["kd"]["best"], seed, ctx, store))
    acc = {m: [r["test_accuracy"] for r in runs[m]] for m in METHODS}
    claims = {"srm-kd": protocol.claim(acc["srm"], acc["kd"]), "srm-at": protocol.claim(acc["srm"], acc["at"]),
              "srm-kdlong": protocol.claim(acc["srm"], acc["kdlong"]),
              "srm-ce": protocol.claim(acc["srm"], acc["ce"]), "kd-ce": protocol.claim(acc["kd"], acc["ce"])}
    convergence = {m: [protocol.convergence(r["curve"]) for r in runs[m]] for m in METHODS}
    results = {
        "protocol": {k: v for k, v in cfg.items() if k != "grid"}, "grid": list(cfg["grid"]),
        "teacher": {**tcfg, "accuracy": teacher_acc, "cache": cache, "trained_on": len(train_part)},
        "student": dict(cfg["student"]),
        "data": {"train_part": len(train_part), "validation": len(val_set), "student_train": len(students_train),
                 "test": len(test_set), "curve": len(curve_set)},
        "pairs": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()} for p in pairs],
        "codewords": [{"teacher_layer": p["teacher"], "D": p["teacher_channels"], "K": num_codewords(p["teacher_channels"]),
                       "k": active_codes(p["teacher_channels"])} for p in pairs],
        "tuning": tuning, "runs": runs,
        "accuracy": {m: {"accuracy": acc[m], "mean": common.mean_std(acc[m])[0], "std": common.mean_std(acc[m])[1]}
                     for m in METHODS},
        "claims": claims, "convergence": convergence,
        "converged": all(c["converged"] for cs in convergence.values() for c in cs),
        "experiment_s": timer.seconds,
        "training_s": sum(r["time_s"] for r in _distinct_runs(runs, tuned_runs)),
        "run_count": len(_distinct_runs(runs, tuned_runs)),
    }
    results["figures"] = _protocol_figures(out_dir, results, runs)
    srm_key = f"srm-{_setting_key(tuning['srm']['best'])}-seed{seeds[0]}"
    dictionaries = _load_dictionaries(store, srm_key, pairs)
    if dictionaries is not None:
        view = types.SimpleNamespace(pairs=pairs, dictionaries=dictionaries)
        images = torch.stack([test_set[i][0] for i in range(min(4, len(test_set)))])
        results["pixel_label_codewords_used"] = _pixel_label_figure(
            teacher, view, images, os.path.join(out_dir, "srm_pixel_labels.png"), device)
        results["figures"].append("srm_pixel_labels.png")
    return results


def _render_protocol(results) -> str:
    cfg, acc, claims = results["protocol"], results["accuracy"], results["claims"]
    t, s = results["teacher"], results["student"]
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = [
        f"# SRM: sparse representation matching on {results['data_info']['name']} ({results['run']['budget']} budget)", "",
        f"Paper: {PAPER}.", "",
        f"Command: `{results['run']['command']}`", "",
        "## Setting", "",
        f"- Validation split: {results['data']['validation']} training images held out (class-stratified, "
        f"{100 * cfg['val_fraction']:g} %); every choice below (the alpha / T grid, the state each run keeps) is "
        "made on it, never on the test set.",
        f"- Teacher {t['name']} (width {t['width']:g}), trained once with CE on the {t['trained_on']} images of the "
        f"training part ({t['epochs']} epochs, SGD {t['lr']:g}, cosine) and cached: test accuracy {pct(t['accuracy'])} %; "
        f"its training took {t['cache']['train_s']:.0f} s"
        + (" (in an earlier run: loaded from the cache)" if t["cache"]["cached"] else "") + ", not counted below.",
        f"- Student {s['name']} (width {s['width']:g}), another architecture (residual blocks, strided convolutions "
        f"against VGG blocks with max pooling), trained on {results['data']['student_train']} images of the training part.",
        "- Matched layers (equal spatial size), dictionary size K = int(m D) and active codes k = int(D m r) with "
        "the official m = 2, r = 0.02: " + "; ".join(
            f"{p['teacher']} -> {p['student']} ({p['size'][0]}x{p['size'][1]}, D = {c['D']}, K = {c['K']}, k = {c['k']})"
            for p, c in zip(results["pairs"], results["codewords"]))
        + " (the official DenseNet-121 teacher: k = 5, 10, 40).",
        f"- Schedules (Adam, the official LR phases, a new Adam at each phase): SRM dictionaries "
        f"{cfg['dictionary_epochs']}, matching {cfg['init_epochs']}, KD stage {cfg['epochs']} epochs; CE, KD and AT "
        f"{cfg['epochs']} epochs with the KD stage's optimiser (lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}); "
        f"KD also for {cfg['init_epochs'] + cfg['epochs']} epochs, as many as SRM's student trains (matching + KD stage), "
        "at KD's tuned alpha and T (kdfast's control for SRM's extra epochs; its LR phases scale with its length). "
        "Each run keeps its best state on the validation split, scored at the end of each LR phase (the official "
        "selection); accuracies below are the test accuracy of that state.",
        f"- KD and SRM's KD stage: alpha T^2 KL + (1 - alpha) CE, alpha and T chosen on the validation split at seed "
        f"{results['run']['seeds'][0]} from {len(results['grid'])} settings; AT: {cfg['at_beta']:g} x attention loss "
        "+ CE at the matched layers (untuned, RepDistiller's weight).",
        f"- Seeds {results['run']['seeds']} (same student initialisation per seed across methods).", "",
        "## Tuning on the validation split", "",
        "| method | chosen | validation accuracy % per setting |", "|---|---|---|",
    ]
    for m in ("kd", "srm"):
        tun = results["tuning"][m]
        lines.append(f"| {LABELS[m]} | {_setting_key(tun['best'])} | "
                     + ", ".join(f"{_setting_key(r['setting'])}: {pct(r['val_accuracy'])}" for r in tun["table"]) + " |")
    lines += ["", "## Test accuracy", "", "| method | accuracy % (mean ± std) | per seed |", "|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {LABELS[m]} | {common.fmt_mean_std(acc[m]['accuracy'])} | "
                     + ", ".join(pct(a) for a in acc[m]["accuracy"]) + " |")
    lines += ["", "## Claims (paired by seed, 95 % t interval of the difference)", "",
              "| claim | difference (points) | 95 % CI | verdict | every run converged |", "|---|---|---|---|---|"]
    names = {"srm-kd": "SRM beats KD", "srm-at": "SRM beats AT",
             "srm-kdlong": "SRM beats KD trained as many epochs (kdfast's control)",
             "srm-ce": "SRM beats CE (context)", "kd-ce": "KD beats CE (context)"}
    for key, c in claims.items():
        # a claim compares two methods ("srm-kd"): it stands at convergence when both methods' runs converged
        checks = [protocol.convergence(r["curve"]) for m in key.split("-") for r in results["runs"][m]]
        lines.append(f"| {names[key]} | {100 * c['mean']:+.2f} ± {100 * c['std']:.2f} | {common.fmt_ci(c['ci95'])} | "
                     f"{c['verdict']} | {protocol.converged_cell(checks)} |")
    rows, every = protocol.tail_table({LABELS[m]: [r["curve"] for r in results["runs"][m]] for m in METHODS})
    curve_images = results["data"].get("curve", results["data"]["test"])
    lines += ["", "## Convergence (test accuracy over the last 20 % of the epochs)", "",
              f"The curve: test accuracy after every epoch on {curve_images} test images"
              + (" (a class-stratified subset, the same for every run)." if curve_images < results["data"]["test"]
                 else "."), "",
              "| method | runs converged | largest move in the last 20 % |", "|---|---|---|", *rows, "",
              "Every run converged (moved less than 1 point)." if every else
              "**Budget too small**: not every run converged (moved 1 point or more in the last 20 % of its "
              "epochs); a verdict whose runs did not all converge (the claims' last column) is about this budget, "
              "not about the methods at convergence.",
              "Under the official schedule the last phase runs at LR 1e-5, so a flat tail says this schedule has "
              "ended, not that a longer one would gain nothing.", "",
              "## Figures", "", *[f"![{f}]({f})" for f in results["figures"]], "",
              f"Time: {results['training_s'] / 60:.1f} min of training over the {results['run_count']} runs (tuning "
              f"included; the teacher apart), {results['experiment_s'] / 60:.1f} min in this invocation (runs loaded "
              f"from `runs/` take none); device {results['run']['device']}.", ""]
    return "\n".join(lines)


def run(out_dir: str, *, dataset: str = "digits", data_root=None, budget: str = "quick", seeds=None,
        device: str = "cpu") -> dict:
    """``kdfast experiment srm``: the protocol of :func:`run_protocol` (:data:`PROTOCOL` per budget) on
    ``dataset``: teacher vgg8 -> student resnet8, CE / KD (alpha, T tuned on a validation split) / AT / SRM
    over ``seeds`` (default 0, 1, 2), paired claims with 95 % intervals, convergence. "quick" (minutes):
    a narrow teacher, few epochs, a 2-setting grid and, on datasets other than digits, a 10,000 / 2,000-image
    subset. Finished runs are kept in ``out_dir/runs`` and checkpointed in ``out_dir/checkpoints``: the
    same command resumes an interrupted experiment. Writes report.md, results.json and PNGs."""
    seeds = common.check_run(dataset, budget, seeds, device)
    cfg = _protocol_config(budget)
    if seeds is not None:
        cfg["seeds"] = tuple(seeds)
    subsets = common.quick_subsets(dataset, budget)
    train_set, test_set = common.load_data(dataset, data_root, train_subset=subsets[0], test_subset=subsets[1])
    results = run_protocol(out_dir, cfg, train_set, test_set, dataset=dataset, device=device)
    results["data_info"] = common.data_info(train_set, test_set, dataset, data_root)
    results["run"] = common.run_record(NAME, out_dir, dataset=dataset, data_root=data_root, budget=budget,
                                       seeds=list(cfg["seeds"]), device=device)
    common.write_report(out_dir, _render_protocol(results), results)
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
