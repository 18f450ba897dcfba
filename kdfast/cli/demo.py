"""`kdfast demo`: the tour of every source paper on the embedded digits data, one report.

1. One teacher (kdfast.models vgg8 at width 0.25, trained with cross-entropy) shared by every section.
2. One section per source paper (``kdfast.experiments.available()``, in the registry's order), each
   given the teacher, the data, the seeds and a time budget (:class:`kdfast.experiments.common.DemoContext`).
   The first, "kd", is the Tucker + KD + robustness protocol of Sadhukhan et al. (ICIP 2020).
3. ``report.md`` (a section per paper), ``results.json`` (each section's numbers), the sections' PNGs
   and model checkpoints in the output directory.

The whole tour is sized for at most 6 minutes on 2 CPU cores; each section reports its own time.
"""
from __future__ import annotations

import math
import os
import platform
import time

import torch

from ..experiments import common

# Seconds each section may take on 2 CPU cores (the kd protocol has its own fixed size).
SECTION_BUDGET_S = 45.0


def run_tour(out: str, *, device: str = "cpu", seed: int = 0, repeats: int = 3, tiny: bool = False,
             methods=None, teacher_epochs: int | None = None, student_epochs: int | None = None,
             model: str | None = None, width: float | None = None, ranks=None, latency_batch: int | None = None) -> dict:
    """Runs the tour; writes report.md and results.json into ``out`` and returns the results. ``methods``:
    the sections to run (experiment names or aliases, e.g. ["kd", "bss"]; default all, in the tour's order)."""
    from .. import experiments as registry
    from .. import model_file
    from ..experiments import kd

    start = time.perf_counter()
    names = registry.available() if methods is None else list(dict.fromkeys(registry.resolve(n) for n in methods))
    os.makedirs(out, exist_ok=True)
    cfg = (kd.DemoConfig.tiny_config if tiny else kd.DemoConfig)(out=out, device=device, seed=seed, repeats=repeats)
    for key, value in (("model", model), ("width", width), ("ranks", ranks), ("latency_batch", latency_batch),
                       ("teacher_epochs", teacher_epochs), ("student_epochs", student_epochs)):
        if value is not None:
            setattr(cfg, key, value)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")

    # ---- the shared teacher ------------------------------------------------------------------------
    train_set, test_set = common.digits(cfg.image_size, cfg.train_subset, cfg.test_subset)
    with common.Timer() as t_teacher:
        teacher, model_kwargs, teacher_acc = common.train_teacher(
            train_set, test_set, name=cfg.model, width=cfg.width, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr,
            seed=cfg.seed, device=dev)
    print(f"teacher {cfg.model} (width {cfg.width:g}): {cfg.teacher_epochs} epochs in {t_teacher.seconds:.1f}s, "
          f"test accuracy {100 * teacher_acc:.2f}%", flush=True)
    model_file.save_model(os.path.join(out, "teacher.pt"), teacher, cfg.model, model_kwargs,
                          {"name": "digits", "image_size": cfg.image_size, "root": None},
                          {"role": "teacher", "test_accuracy": teacher_acc})
    ctx = common.DemoContext(teacher=teacher, teacher_name=cfg.model, model_kwargs=model_kwargs, train_set=train_set,
                           test_set=test_set, device=dev, seeds=[seed + r for r in range(repeats)], out_dir=out,
                           budget_s=SECTION_BUDGET_S, tiny=tiny)

    # ---- one section per method ----------------------------------------------------------------------
    sections = []
    for name in names:
        module = registry.get(name)
        print(f"\n== {name}: {module.TITLE}", flush=True)
        if name == "kd":  # the protocol's own knobs (epochs, ranks, latency batch) come from cfg
            section = kd.demo_section(ctx, cfg)
        else:
            section = module.demo_section(ctx)
        print(f"== {name}: {section.time_s:.0f} s", flush=True)
        sections.append((module, section))
    total = time.perf_counter() - start

    results = {
        "teacher": {"model": cfg.model, "width": cfg.width, "epochs": cfg.teacher_epochs,
                    "test_accuracy": teacher_acc, "train_s": t_teacher.seconds},
        "data": {"name": "digits", "train": len(train_set), "test": len(test_set), "image_size": cfg.image_size},
        "seeds": ctx.seeds,
        "sections": {s.name: s.results for _, s in sections},
        "section_time_s": {s.name: s.time_s for _, s in sections},
        "total_s": total,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(dev)},
    }
    common.write_report(out, render_tour(results, sections), results)
    print(f"\nwrote {out}/report.md and results.json (total {total:.0f} s)", flush=True)
    return results


def render_tour(results: dict, sections) -> str:
    teacher = results["teacher"]
    data = results["data"]
    lines = [
        "# kdfast demo: a tour of the source papers on the digits data",
        "",
        f"scikit-learn's digits ({data['train']} train / {data['test']} test images, {data['image_size']}x"
        f"{data['image_size']}, fixed split). One teacher for every section: `{teacher['model']}` at width "
        f"{teacher['width']:g}, {teacher['epochs']} epochs of cross-entropy, test accuracy "
        f"{100 * teacher['test_accuracy']:.2f}% ({teacher['train_s']:.0f} s). Seeds {results['seeds']}.",
        "",
        "| section | paper | time (s) |",
        "|---|---|---|",
    ]
    for module, section in sections:
        lines.append(f"| [{section.title}](#{_anchor(section.title)}) | {module.PAPER} | {section.time_s:.0f} |")
    env = results["environment"]
    lines += ["", f"Total {results['total_s']:.0f} s on {env['device']} ({env['threads']} threads, "
              f"{env['cpu_count']} CPUs), torch {env['torch']}.", ""]
    for module, section in sections:
        lines += [f"## {section.title}", "", f"*{module.PAPER}*", "", section.markdown.strip(), ""]
    return "\n".join(lines)


def _anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return keep.replace(" ", "-")


def main_demo(args) -> int:
    epochs = args.epochs
    run_tour(args.out, device=args.device, seed=args.seed, repeats=args.repeats if args.repeats is not None else
             (2 if args.tiny else 3), tiny=args.tiny, model=args.model, width=args.width, ranks=args.ranks,
             latency_batch=args.latency_batch, teacher_epochs=epochs,
             student_epochs=max(1, math.ceil(epochs / 2)) if epochs is not None else None)
    return 0
