"""Adversarial robustness of a classifier: clean, FGSM and PGD accuracy per epsilon.

The evaluation behind the claim of Sadhukhan et al., "Knowledge Distillation Inspired Fine-Tuning
of Tucker Decomposed CNNs and Adversarial Robustness Analysis" (ICIP 2020): a KD-fine-tuned
Tucker student is compared with a CE-fine-tuned one by accuracy under L-inf attacks. The paper's
protocol (attacks, epsilons, numbers) is not public; this module uses the standard FGSM and PGD
(kdfast.attacks) with cross-entropy, white-box, untargeted, on every sample of the loader.

    report = kdfast.robustness_report(model, test_loader, eps=[0, 1/255, 2/255, 4/255, 8/255], plot="rob.png")
    print(report)            # markdown table
    report.to_dict()         # JSON-ready

Epsilons are in pixel units of [0, 1] images. The data's normalisation (per-channel ``std`` and the valid
range ``clamp``) comes from the loader's dataset (``loader.dataset.std`` / ``.clamp_range``, as
kdfast.data datasets have) or from the ``std=`` / ``clamp=`` arguments; when neither says it, the report
refuses to guess (an epsilon in normalised units is a different, larger attack). ``units="input"``
attacks in the model's input units instead, on purpose.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from . import attacks

DEFAULT_EPS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)


@dataclass
class RobustnessReport:
    """Accuracies (fractions in [0, 1]) of one model; ``fgsm[i]``/``pgd[i]`` are at ``eps[i]``."""

    eps: list[float]
    clean: float
    fgsm: list[float]
    pgd: list[float]
    n: int
    pgd_steps: int
    step_size: list[float]
    eps_units: str = "input"
    name: str = "model"
    extra: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [
            {"eps": e, "clean": self.clean, "fgsm": f, "pgd": p, "pgd_step_size": s}
            for e, f, p, s in zip(self.eps, self.fgsm, self.pgd, self.step_size)
        ]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "n": self.n,
            "clean": self.clean,
            "eps": list(self.eps),
            "eps_units": self.eps_units,
            "fgsm": list(self.fgsm),
            "pgd": list(self.pgd),
            "pgd_steps": self.pgd_steps,
            "pgd_step_size": list(self.step_size),
            **self.extra,
        }

    def __str__(self) -> str:
        lines = [
            f"Robustness of {self.name}: {self.n} samples, clean accuracy {100 * self.clean:.2f}%, "
            f"PGD {self.pgd_steps} steps (eps in {self.eps_units} units)",
            "",
            "| eps | clean acc (%) | FGSM acc (%) | PGD acc (%) |",
            "|---:|---:|---:|---:|",
        ]
        for e, f, p in zip(self.eps, self.fgsm, self.pgd):
            lines.append(f"| {_fmt_eps(e)} | {100 * self.clean:.2f} | {100 * f:.2f} | {100 * p:.2f} |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> str:
        """Accuracy vs epsilon (FGSM and PGD) as a PNG; returns the path."""
        return plot_reports([self], path, title=title)


def _fmt_eps(e: float) -> str:
    k = e * 255
    if e > 0 and abs(k - round(k)) < 1e-6:
        return f"{e:.4g} ({round(k)}/255)"
    return f"{e:.4g}"


def plot_reports(reports: list[RobustnessReport], path: str | os.PathLike, title: str | None = None,
                 colors: list[str] | None = None) -> str:
    """One PNG with FGSM (dashed) and PGD (solid) accuracy vs eps for several models.

    ``colors``: one matplotlib colour per report (default C0, C1, ...), so a caller can keep one colour
    per model across several figures. Pixel-unit eps are labelled in k/255 as the report tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.2))
    for i, rep in enumerate(reports):
        color = colors[i] if colors is not None else f"C{i}"
        ax.plot(rep.eps, [100 * a for a in rep.pgd], "-o", color=color, label=f"{rep.name} PGD-{rep.pgd_steps}")
        ax.plot(rep.eps, [100 * a for a in rep.fgsm], "--s", color=color, alpha=0.7, label=f"{rep.name} FGSM")
    if reports and reports[0].eps_units.startswith("pixel"):
        ticks = sorted({e for rep in reports for e in rep.eps})
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{e * 255:.3g}/255" if e else "0" for e in ticks])
        ax.set_xlabel("eps (L-inf, pixel units of [0, 1] images)")
    else:
        ax.set_xlabel(f"eps (L-inf, {reports[0].eps_units} units)" if reports else "eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title or "Accuracy under attack")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _batch_xy(batch):
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    raise TypeError("loader must yield (x, y) or (x, y, ...) tuples or dicts with 'x' and 'y'")


def _normalisation(loader, std, clamp, units: str):
    """(std, clamp) of the attack: given, else the loader's dataset's; pixel units need a std."""
    if units not in ("pixel", "input"):
        raise ValueError(f"units must be 'pixel' or 'input', got {units!r}")
    dataset = getattr(loader, "dataset", None)
    if clamp is None:
        clamp = getattr(dataset, "clamp_range", None)
    if units == "input":
        if std is not None:
            raise ValueError("units='input' attacks in the model's input units: std does not apply (eps is not converted)")
        return None, clamp
    if std is None:
        std = getattr(dataset, "std", None)
    if std is None:
        raise ValueError(
            "robustness_report: eps is in pixel units of [0, 1] images, but the data's normalisation is unknown "
            "(the loader's dataset has no .std): pass std= and clamp= (e.g. dataset.std and dataset.clamp_range; "
            "std=1.0, clamp=(0.0, 1.0) for un-normalised [0, 1] inputs), or units='input' to attack in the model's "
            "input units")
    return std, clamp


def robustness_report(
    model: torch.nn.Module,
    loader,
    eps=DEFAULT_EPS,
    pgd_steps: int = 10,
    step_size: float | None = None,
    clamp=None,
    std=None,
    plot: str | os.PathLike | None = None,
    device=None,
    max_batches: int | None = None,
    random_start: bool = True,
    seed: int = 0,
    name: str = "model",
    units: str = "pixel",
) -> RobustnessReport:
    """Clean, FGSM and PGD accuracy of ``model`` on ``loader`` for each epsilon.

    Args:
        eps: L-inf radii, in pixel units (data in [0, 1] before normalisation; the attack uses eps / std
            per channel), or in the model's input units with ``units="input"``.
        pgd_steps: PGD iterations; ``step_size`` defaults to 2.5 * eps / pgd_steps (per eps).
            A given ``step_size`` is in the same units as ``eps``.
        clamp: valid input range (lo, hi) in the model's input units; default: the loader's
            ``dataset.clamp_range`` (kdfast.data datasets), else no clamping.
        std: per-channel normalisation std; default: the loader's ``dataset.std``. With pixel units
            (the default) one of the two is required: ``std=1`` for un-normalised [0, 1] inputs.
        units: "pixel" (default) or "input" (eps and step_size in the model's input units, no std).
        plot: if given, a PNG of accuracy vs eps is written there.
        device: where to evaluate (default: the model's device).
        max_batches: evaluate on the first ``max_batches`` batches only.
        seed: seeds PGD's random start (reproducible reports).

    The model runs in eval mode; its modes and requires_grad flags are restored afterwards.
    """
    eps = [float(e) for e in (eps if isinstance(eps, (list, tuple)) else [eps])]
    if not eps:
        raise ValueError("eps must hold at least one value")
    for e in eps:
        if not math.isfinite(e) or e < 0:
            raise ValueError(f"eps values must be finite and >= 0, got {e}")
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise ValueError(f"pgd_steps must be an int >= 1, got {pgd_steps!r}")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    device = torch.device(device) if device is not None else _model_device(model)
    std, clamp = _normalisation(loader, std, clamp, units)
    std_t = None if std is None else torch.as_tensor(std, dtype=torch.float32).flatten()
    if std_t is not None and (std_t <= 0).any():
        raise ValueError(f"std must be > 0, got {std}")
    steps_used = [step_size if step_size is not None else 2.5 * e / pgd_steps for e in eps]

    correct_clean = 0
    correct_fgsm = [0] * len(eps)
    correct_pgd = [0] * len(eps)
    n = 0
    gen = torch.Generator(device=device).manual_seed(seed)
    with attacks.attack_mode(model):  # restores modes/flags even if an attack raises
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x, y = _batch_xy(batch)
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                clean_pred = model(x).argmax(1)
            correct_clean += int((clean_pred == y).sum())
            for i, e in enumerate(eps):
                if e == 0:
                    # no perturbation: the attacks return x itself
                    correct_fgsm[i] += int((clean_pred == y).sum())
                    correct_pgd[i] += int((clean_pred == y).sum())
                    continue
                e_in = e if std_t is None else (e / std_t).tolist()
                s_in = steps_used[i] if std_t is None else (steps_used[i] / std_t).tolist()
                x_f = attacks.fgsm(model, x, y, e_in, clamp=clamp)
                x_p = attacks.pgd(model, x, y, e_in, s_in, pgd_steps, random_start=random_start, clamp=clamp, generator=gen)
                with torch.no_grad():
                    correct_fgsm[i] += int((model(x_f).argmax(1) == y).sum())
                    correct_pgd[i] += int((model(x_p).argmax(1) == y).sum())
            n += y.shape[0]
    if n == 0:
        raise ValueError("loader yielded no samples")
    report = RobustnessReport(
        eps=eps,
        clean=correct_clean / n,
        fgsm=[c / n for c in correct_fgsm],
        pgd=[c / n for c in correct_pgd],
        n=n,
        pgd_steps=pgd_steps,
        step_size=steps_used,
        eps_units="pixel ([0, 1])" if std_t is not None else "input",
        name=name,
    )
    if plot is not None:
        report.plot(plot)
    return report
