"""Markdown table + chart of benchmarks/bench_train_step.py results (reuses report.py's loading,
trimming and formatting).

    python benchmarks/report_train_step.py train.json --out benchmarks/results/<device>/train-step

writes <name>.md (per group: each formulation's median step time, steps/s, ratio vs kdfast, peak
memory), <name>.png (steps/s per formulation and group) and <name>.json (the input without raw
timings).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402

IMPL_ORDER = ["kdfast", "pytorch", "repdistiller", "dense-student"]
IMPL_LABEL = {
    "kdfast": "kdfast (TuckerConv2d + fused KD/NST ops)",
    "pytorch": "plain PyTorch (3-conv Sequential, F.kl_div, bmm NST)",
    "repdistiller": "RepDistiller (3-conv Sequential, DistillKL, broadcast NST)",
    "dense-student": "dense student, kdfast losses (extra: no decomposition)",
}
COLORS = {"kdfast": "#C44E52", "pytorch": "#4C72B0", "repdistiller": "#DD8452", "dense-student": "#8C8C8C"}


def groups(rows):
    out = OrderedDict()
    for r in rows:
        if r["info"].get("loss") != "train-step":
            continue
        out.setdefault(r["group"], {})[r["impl"]] = r
    return out


def table(rows) -> list[str]:
    lines = [
        "| group | formulation | median ms / step | steps/s | IQR ms | rounds | vs kdfast | peak MiB | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for group, impls in groups(rows).items():
        k = impls.get("kdfast")
        first = True
        for impl in [i for i in IMPL_ORDER if i in impls] + [i for i in impls if i not in IMPL_ORDER]:
            r = impls[impl]
            cell = f"**{group.replace('train-step ', '')}**" if first else ""
            first = False
            if r["median"] is None:
                lines.append(f"| {cell} | {IMPL_LABEL.get(impl, impl)} | n/a | | | | | | {r['status']} |")
                continue
            vs = "1 (ref)" if impl == "kdfast" else (report.fmt_ratio(r["median"] / k["median"]) if k and k["median"] else "")
            iqr = f"{report.fmt_ms(r['q1'])}–{report.fmt_ms(r['q3'])}" if r["q1"] is not None else ""
            lines.append(
                f"| {cell} | {IMPL_LABEL.get(impl, impl)} | {report.fmt_ms(r['median'])} | {1 / r['median']:.2f} | {iqr} | "
                f"{r['rounds']} | {vs} | {report.fmt_mib(r['peak_bytes'])} | {r['status']} |"
            )
    return lines


def interleaved_table(rows) -> list[str]:
    """test_train_step_interleaved: all formulations of a group timed in turns, each round's order
    rotated; the paired ratio is the median over rounds of (formulation step / kdfast step)."""
    inter = [r for r in rows if r["info"].get("loss") == "train-step-interleaved"]
    if not inter:
        return []
    lines = [
        "## Interleaved (paired) measurement",
        "",
        "The same steps timed in turns within each round (order rotated every round), so slow drift of the "
        "machine hits every formulation alike. *Paired vs kdfast* = median over rounds of (formulation step / "
        "kdfast step in the same round); > 1: kdfast faster. This is the ratio to quote; the table above times "
        "each formulation on its own, minutes apart.",
        "",
        "| group | formulation | median ms / step | paired vs kdfast | rounds |",
        "|---|---|---:|---:|---:|",
    ]
    for r in inter:
        info = r["info"]
        first = True
        for impl in IMPL_ORDER:
            if impl not in info["median_s"]:
                continue
            cell = f"**{r['group'].replace('train-step-interleaved ', '')}**" if first else ""
            first = False
            ratio = info["paired_ratio_vs_kdfast"][impl]
            vs = "1 (ref)" if impl == "kdfast" else report.fmt_ratio(ratio)
            lines.append(f"| {cell} | {IMPL_LABEL[impl]} | {report.fmt_ms(info['median_s'][impl])} | {vs} | {info['rounds']} |")
    return lines + [""]


def chart(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = groups(rows)
    if not gs:
        return
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(gs) + 2) + 4, 4.2))
    width = 0.8 / len(IMPL_ORDER)
    for j, impl in enumerate(IMPL_ORDER):
        for x, (group, impls) in enumerate(gs.items()):
            r = impls.get(impl)
            if r is None or r["median"] is None:
                continue
            ax.bar(x - 0.4 + width * (j + 0.5), 1 / r["median"], width=width * 0.92, color=COLORS[impl])
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[i]) for i in IMPL_ORDER]
    ax.legend(handles, [IMPL_LABEL[i] for i in IMPL_ORDER], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)
    ax.set_xticks(range(len(gs)))
    ax.set_xticklabels([g.replace("train-step ", "").replace(" ", "\n") for g in gs], fontsize=8)
    ax.set_ylabel("training steps / s (higher is better)")
    ax.set_title("One KD training step: teacher fwd + student fwd/bwd + losses + SGD step")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", nargs="+", help="pytest-benchmark JSON file(s) of bench_train_step.py")
    ap.add_argument("--out", required=True, help="output path without extension: writes .md, .png and .json")
    ap.add_argument("--no-json", action="store_true", help="do not write the trimmed <out>.json")
    args = ap.parse_args(argv)
    rows, not_run, machine, meta = report.load(args.bench, [])
    if not groups(rows):
        sys.exit("no train-step rows in the input")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    name = os.path.basename(args.out)
    k = machine.get("kdfast", {})
    md = [
        f"# kdfast KD training-step benchmark: `{name}`",
        "",
        f"- **Date (UTC)**: {k.get('date', '?')}; **CPU**: {k.get('cpu_model', '?')}, {k.get('cpu_count', '?')} logical CPUs, "
        f"torch threads {k.get('torch_threads', '?')}" + (f"; **GPU**: {k['gpu']}" if k.get("gpu") else ""),
        f"- **Software**: torch {k.get('torch', '?')}; mode: {'quick' if k.get('quick_mode') else 'full'}",
        f"- **Load average** at start / end: {k.get('load_avg_start')} / {k.get('load_avg_end')}",
        "",
        "A step = teacher forward (no grad) + student forward + losses + backward + SGD step, random 32x32 inputs, "
        "100 classes. The student is the teacher with every 3x3 conv Tucker-2 decomposed at half ranks; every "
        "formulation starts from the same weights. *vs kdfast* = formulation time / kdfast time (> 1: kdfast faster). "
        "*Peak MiB*: memory allocated during one step above what was allocated before it.",
        "",
    ]
    md += table(rows)
    md += ["", f"![steps per second]({name}.png)", ""]
    md += interleaved_table(rows)
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(md))
    chart(rows, args.out + ".png")
    if not args.no_json:
        with open(args.out + ".json", "w") as fh:
            json.dump(report.trimmed_json(args.bench, not_run), fh, indent=1)
    print(f"wrote {args.out}.md, {args.out}.png" + ("" if args.no_json else f", {args.out}.json"))


if __name__ == "__main__":
    main()
