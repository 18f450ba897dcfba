"""Turn a pytest-benchmark JSON of benchmarks/bench_losses.py into a markdown report and a chart.

    python benchmarks/report.py bench.json [--oom oom.json] --out benchmarks/results/<device>/<benchmark>

writes <name>.md (tables, machine header, targets evaluated from the data), <name>.png (speed-up of
kdfast over each baseline per shape, log scale, OOM cells marked) and <name>.json (the input
without raw per-round timings, with the untimed-case records merged in: small enough to commit).

Untimed cases (out of memory, unsupported) come from the JSON's "kdfast" -> "not_run" list that
benchmarks/conftest.py writes, and from --oom files (conftest's --kdfast-oom output).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict, defaultdict

MiB = 1024**2
GiB = 1024**3

IMPL_ORDER = ["kdfast", "bmm", "repdistiller", "torchdistill", "torch", "torch_compile"]
IMPL_LABEL = {
    "kdfast": "kdfast",
    "bmm": "bmm (plain PyTorch)",
    "repdistiller": "RepDistiller",
    "torchdistill": "torchdistill",
    "torch": "PyTorch (log_softmax + kl_div + cross_entropy)",
    "torch_compile": "PyTorch, torch.compile (inductor)",
}
FAMILY_TITLE = {
    "nst": "NST (poly kernel: kdfast vs baselines; kdfast's linear and gaussian kernels as extra rows)",
    "fsp": "FSP",
    "kd": "Hinton KD loss (alpha = 0.9, T = 4: CE + KL)",
}
TIER_ORDER = {"cifar": 0, "headline": 1, "imagenet": 2}
BAR_COLORS = {"bmm": "#4C72B0", "repdistiller": "#DD8452", "torchdistill": "#55A868", "torch": "#4C72B0",
              "torch_compile": "#8172B3"}
HEADLINE = {"B": 64, "Cs": 256, "Ct": 512, "Hs": 8, "Ht": 8}


# ============================================================================================ loading
def paired_table(paths_bench) -> list[str]:
    """harness.time_paired rows: kdfast and one baseline timed in alternation."""
    rows = []
    for path in paths_bench:
        with open(path) as fh:
            rows += [b["extra_info"] for b in json.load(fh).get("benchmarks", [])
                     if b.get("extra_info", {}).get("suite") == "paired"]
    if not rows:
        return []
    lines = [
        "## Paired: kdfast against the plain-PyTorch formulation, timed in alternation",
        "",
        "The per-formulation tables time each formulation on its own, one after another; on a shared machine "
        "millisecond cells move by up to about 30% between runs. Here kdfast and the baseline run in turns on "
        "the same inputs (order swapped every round) and the ratio is taken per round. *baseline / kdfast* > 1: "
        "kdfast faster; Q1–Q3 of the per-round ratios. This is the ratio to quote for small shapes.",
        "",
        "| loss | shape | dtype / device | baseline | kdfast ms | baseline ms | baseline / kdfast | Q1–Q3 | rounds |",
        "|---|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['shape']} | {r['dtype']} {r['device']} | {r['baseline']} | "
            f"{fmt_ms(r['median_s']['kdfast'])} | {fmt_ms(r['median_s']['baseline'])} | **{r['ratio']:.2f}x** | "
            f"{r['ratio_q1']:.2f}–{r['ratio_q3']:.2f} | {r['rounds']} |"
        )
    return lines + [""]


def load(paths_bench, paths_oom):
    rows, not_run, machine, meta = [], [], {}, {}
    for path in paths_bench:
        with open(path) as fh:
            data = json.load(fh)
        machine = machine or data.get("machine_info", {})
        meta = meta or {"datetime": data.get("datetime"), "commit_info": data.get("commit_info", {})}
        for b in data.get("benchmarks", []):
            if b.get("extra_info", {}).get("suite") in ("trainer", "paired"):  # own tables (paired_table)
                continue
            rows.append(_row_from_bench(b))
        not_run.extend(data.get("kdfast", {}).get("not_run", []))
    for path in paths_oom:
        with open(path) as fh:
            not_run.extend(json.load(fh).get("not_run", []))
    seen = {(r["group"], r["impl"]) for r in rows}
    for rec in not_run:
        row = _row_from_record(rec)
        key = (row["group"], row["impl"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows, not_run, machine, meta


def _base_row(group, info):
    loss = info.get("loss") or group.split()[0]
    impl = info.get("impl", "?")
    kernel = info.get("kernel")
    return {
        "group": group,
        "loss": loss,
        "family": "nst" if loss.startswith("nst") else ("kd" if loss == "kd" else "fsp"),
        "impl": impl,
        "label": f"kdfast ({kernel} kernel)" if loss in ("nst-linear", "nst-gaussian") else IMPL_LABEL.get(impl, impl),
        "is_extra": loss in ("nst-linear", "nst-gaussian"),
        "shape": info.get("shape", ""),
        "shape_key": info.get("shape_key"),
        "shape_index": info.get("shape_index", 10**6),
        "tier": info.get("tier", ""),
        "dtype": info.get("dtype", ""),
        "device": info.get("device", ""),
        "info": info,
        "est_bytes": info.get("est_peak_bytes"),
        "gemm_flops": info.get("gemm_flops") or 0.0,
    }


def _row_from_bench(b):
    info = b.get("extra_info", {})
    st = b["stats"]
    row = _base_row(b.get("group") or "", info)
    row.update(
        median=st["median"],
        q1=st.get("q1"),
        q3=st.get("q3"),
        min=st.get("min"),
        rounds=st.get("rounds"),
        peak_bytes=info.get("peak_bytes"),
        status=info.get("status", "ok"),
        kind="ok",
    )
    return row


def _row_from_record(rec):
    info = rec.get("extra_info", {})
    row = _base_row(rec.get("group", ""), info)
    row.update(median=None, q1=None, q3=None, min=None, rounds=0, peak_bytes=None, status=rec["status"], kind=rec.get("kind", "oom"))
    return row


# ============================================================================================ grouping
def shape_blocks(rows, family):
    """OrderedDict {(shape, dtype, device): {"poly"/"fsp": {impl: row}, "extra": [rows]}} in suite order."""
    fam = [r for r in rows if r["family"] == family]
    fam.sort(key=lambda r: (r["device"] != "cpu", r["dtype"], TIER_ORDER.get(r["tier"], 9), r["shape_index"], r["shape"]))
    blocks = OrderedDict()
    for r in fam:
        key = (r["shape"], r["dtype"], r["device"])
        blk = blocks.setdefault(key, {"main": {}, "extra": [], "tier": r["tier"], "info": r["info"]})
        if r["is_extra"]:
            blk["extra"].append(r)
        else:
            blk["main"][r["impl"]] = r
    for blk in blocks.values():
        blk["extra"].sort(key=lambda r: r["loss"])
    return blocks


def ratio(blk, impl):
    """baseline time / kdfast time (> 1: kdfast faster); None when either did not run."""
    k, b = blk["main"].get("kdfast"), blk["main"].get(impl)
    if not k or not b or k["median"] is None or b["median"] is None:
        return None
    return b["median"] / k["median"]


def is_oom(row):
    return row is not None and row["kind"] == "oom"


# ============================================================================================ formatting
def fmt_ms(s):
    if s is None:
        return ""
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def fmt_mib(b):
    if b is None:
        return ""
    mib = b / MiB
    return f"{mib:.2f}" if mib < 100 else f"{mib:,.0f}"


def fmt_ratio(x):
    if x is None:
        return ""
    return f"{x:.2f}x" if x < 10 else f"{x:,.0f}x" if x >= 100 else f"{x:.1f}x"


def machine_header(machine, meta, rows, name):
    k = machine.get("kdfast", {})
    cpu = k.get("cpu_model") or machine.get("cpu", {}).get("brand_raw") or machine.get("processor", "?")
    kinfo = k.get("kdfast_info", {})
    lines = [f"# kdfast loss benchmarks: `{name}`", ""]
    lines.append(f"- **Date (UTC)**: {k.get('date') or meta.get('datetime', '?')}")
    lines.append(
        f"- **CPU**: {cpu}; {k.get('cpu_count', '?')} logical CPUs, torch intra-op threads: {k.get('torch_threads', '?')}; "
        f"MemAvailable at the end: {k.get('mem_available_gib', '?')} GiB"
    )
    if k.get("gpu"):
        lines.append(f"- **GPU**: {k['gpu']}")
    lines.append(
        f"- **Software**: torch {k.get('torch', '?')}, kdfast {kinfo.get('kdfast', '?')} "
        f"(built against torch {kinfo.get('torch (built against)', '?')}), Python {machine.get('python_version', '?')}"
    )
    binary = k.get("kdfast_binary")
    if binary:
        lines.append(
            f"- **kdfast binary**: {binary['file']} (mtime {binary['mtime']}, sha256 {binary['sha256_16']}…)"
            + (" — **rebuilt while the benchmarks ran: results may mix builds**" if k.get("kdfast_binary_changed_during_run") else "")
        )
    commit = meta.get("commit_info", {})
    if commit.get("id"):
        lines.append(f"- **Commit**: {commit['id'][:12]}{' (dirty tree)' if commit.get('dirty') else ''}")
    la0, la1 = k.get("load_avg_start"), k.get("load_avg_end")
    if la0 and la1:
        lines.append(f"- **Load average** (1/5/15 min) at start {tuple(round(x, 2) for x in la0)}, at end {tuple(round(x, 2) for x in la1)}")
    steal, others = k.get("cpu_steal_pct_session"), k.get("cpu_others_pct_session")
    if steal is not None:
        noisy = sum(1 for r in rows if "noisy" in str(r.get("status")))
        lines.append(
            f"- **CPU noise** over the session: host steal {steal:.1f}% of CPU time"
            + (f", other processes {others:.1f}%" if others is not None else "")
            + f" (cells timed with >= 2% steal or >= 10% other processes are marked noisy in their status: {noisy})"
        )
    ceil = k.get("matmul_ceiling", {})
    for dev, per in ceil.items():
        parts = ", ".join(f"{dt} {v['gflops']:,.0f} GFLOP/s (n={v['n']})" for dt, v in per.items())
        lines.append(f"- **Matmul ceiling** ({dev}, one square torch.matmul, best of a few): {parts}")
    budgets = sorted({(r["device"], r["info"].get("budget_bytes"), r["info"].get("budget_source")) for r in rows if r["info"].get("budget_bytes")}, key=str)
    for dev, b, src in budgets[:3]:
        lines.append(f"- **Memory budget** ({dev}): {b / GiB:.1f} GiB ({src})")
    mode = "quick (KDFAST_BENCH_QUICK=1: CIFAR shapes + headline NST shape, 3 rounds)" if k.get("quick_mode") else "full"
    lines.append(f"- **Mode**: {mode}")
    lines += [
        "",
        "**Method.** Each cell times one call of the loss followed by `torch.autograd.grad` with respect to the "
        "student's inputs (teacher inputs carry no grad, as in distillation): the median over the timed rounds "
        "(pytest-benchmark `pedantic`; before them one untimed call, plus one warm-up round when that call took "
        "under 1 s; rounds chosen for about 3 s of timed calls per cell, at least 3, at most 200; quick mode: 3). *vs kdfast* = baseline median / kdfast median: above 1 kdfast is faster. "
        "*Peak MiB* = peak of memory allocated during one forward + backward above what was allocated before the call "
        "(inputs excluded, the returned gradients included); on CPU from the allocation and free events of "
        "`torch.profiler` (`profile_memory=True`, running sum in time order), on CUDA from "
        "`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. *GFLOP/s* = the Gram GEMM FLOPs the "
        "formulation performs (forward + backward, 2 per multiply-add) / median time; formulations differ in FLOPs "
        "(kdfast's poly kernel may go through the HW x HW Gram, marked [spatial]). **OOM**: the formulation's peak "
        "memory, estimated before running it, exceeds the budget (or it raised an out-of-memory error), so it was not run; "
        "its peak cell shows the estimate (above the inputs, like the measured peaks), its status the estimate including "
        "the inputs, which is what is compared with the budget.",
        "",
    ]
    return lines


# ============================================================================================ targets
def evaluate_targets(rows):
    out = []
    nst = shape_blocks(rows, "nst")
    fsp = shape_blocks(rows, "fsp")

    # 1. headline
    head = [
        blk
        for (shape, dtype, dev), blk in nst.items()
        if dev == "cpu" and dtype == "float32" and all(blk["info"].get(k) == v for k, v in HEADLINE.items())
    ]
    name = "CPU NST poly, B=64 Cs=256 Ct=512 8x8: kdfast >= 10x faster than RepDistiller"
    if not head or "kdfast" not in head[0]["main"] or "repdistiller" not in head[0]["main"]:
        out.append((name, "NOT MEASURED", "the headline shape is missing from the data"))
    else:
        blk = head[0]
        k, r = blk["main"]["kdfast"], blk["main"]["repdistiller"]
        if k["median"] is None:
            out.append((name, "FAIL", f"kdfast did not run: {k['status']}"))
        elif r["median"] is None:
            verdict = "PASS" if is_oom(r) else "NOT MEASURED"
            out.append((name, verdict, f"RepDistiller: {r['status']}; kdfast {fmt_ms(k['median'])} ms"))
        else:
            x = ratio(blk, "repdistiller")
            out.append(
                (
                    name,
                    "PASS" if x >= 10 else "FAIL",
                    f"{fmt_ratio(x)} (kdfast {fmt_ms(k['median'])} ms vs RepDistiller {fmt_ms(r['median'])} ms)",
                )
            )

    # 2. never slower than bmm on NST
    name = "kdfast never slower than bmm on any NST (poly) shape"
    compared, slower = 0, []
    for (shape, dtype, dev), blk in nst.items():
        k, b = blk["main"].get("kdfast"), blk["main"].get("bmm")
        if not k or not b:
            continue
        if k["median"] is None:
            if b["median"] is not None:
                slower.append(f"{shape} {dtype} {dev}: kdfast did not run ({k['status']})")
            continue
        if b["median"] is None:
            compared += 1  # bmm OOM / unsupported: kdfast not slower
            continue
        compared += 1
        x = b["median"] / k["median"]
        if x < 1:
            overlap = _iqr_overlap(k, b)
            slower.append(
                f"{shape} {dtype} {dev}: kdfast {fmt_ms(k['median'])} ms vs bmm {fmt_ms(b['median'])} ms "
                f"(kdfast {100 * (1 / x - 1):.1f}% slower; interquartile ranges {'overlap' if overlap else 'do not overlap'})"
            )
    if compared == 0:
        out.append((name, "NOT MEASURED", "no NST shape with both kdfast and bmm"))
    elif slower:
        out.append((name, "FAIL", f"slower on {len(slower)} of {compared} shapes: " + "; ".join(slower)))
    else:
        out.append((name, "PASS", f"kdfast at least as fast as bmm on all {compared} NST shapes"))

    # 3. FSP vs bmm: time and memory
    name = "FSP: kdfast at least as fast as bmm, with lower peak memory"
    compared, bad = 0, []
    for (shape, dtype, dev), blk in fsp.items():
        k, b = blk["main"].get("kdfast"), blk["main"].get("bmm")
        if not k or not b:
            continue
        if k["median"] is None:
            bad.append(f"{shape} {dtype} {dev}: kdfast did not run ({k['status']})")
            continue
        compared += 1
        if b["median"] is None:
            continue
        problems = []
        if k["median"] > b["median"]:
            problems.append(
                f"{100 * (k['median'] / b['median'] - 1):.1f}% slower ({fmt_ms(k['median'])} vs {fmt_ms(b['median'])} ms; "
                f"IQRs {'overlap' if _iqr_overlap(k, b) else 'do not overlap'})"
            )
        if k["peak_bytes"] is not None and b["peak_bytes"] is not None and k["peak_bytes"] >= b["peak_bytes"]:
            problems.append(f"peak {fmt_mib(k['peak_bytes'])} MiB, not below bmm's {fmt_mib(b['peak_bytes'])} MiB")
        if problems:
            bad.append(f"{shape} {dtype} {dev}: " + ", ".join(problems))
    if compared == 0:
        out.append((name, "NOT MEASURED", "no FSP shape with both kdfast and bmm"))
    elif bad:
        out.append((name, "FAIL", f"{len(bad)} of {compared} shapes: " + "; ".join(bad)))
    else:
        out.append((name, "PASS", f"faster or equal, and less peak memory, on all {compared} FSP shapes"))
    return out


def _iqr_overlap(a, b):
    if None in (a.get("q1"), a.get("q3"), b.get("q1"), b.get("q3")):
        return True
    return not (a["q3"] < b["q1"] or b["q3"] < a["q1"])


# ============================================================================================ tables
def family_table(rows, family):
    blocks = shape_blocks(rows, family)
    if not blocks:
        return []
    lines = [
        f"## {FAMILY_TITLE[family]}",
        "",
        "| shape | dtype / device | formulation | median ms | IQR ms | rounds | vs kdfast | peak MiB | GFLOP/s | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (shape, dtype, dev), blk in blocks.items():
        first = True
        impls = [i for i in IMPL_ORDER if i in blk["main"]] + [i for i in blk["main"] if i not in IMPL_ORDER]
        for r in [blk["main"][i] for i in impls] + blk["extra"]:
            label = r["label"]
            if r["impl"] == "kdfast" and r["info"].get("nst_form"):
                label += " [spatial]" if r["info"]["nst_form"] == "poly_spatial" else " [channel]"
            shape_cell = f"**{shape}**" + (" (headline)" if blk["tier"] == "headline" else "") if first else ""
            dd = f"{dtype} {dev}" if first else ""
            first = False
            if r["median"] is None:
                oom = is_oom(r)
                est = r["est_bytes"]
                peak_cell = f"est. {est / MiB:,.0f}" if oom and est else ""
                lines.append(
                    f"| {shape_cell} | {dd} | {label} | {'OOM' if oom else 'n/a'} | | | {'OOM' if oom else ''} | {peak_cell} | | {r['status']} |"
                )
                continue
            iqr = f"{fmt_ms(r['q1'])}–{fmt_ms(r['q3'])}" if r["q1"] is not None else ""
            if r["is_extra"]:
                vs = "—"
            elif r["impl"] == "kdfast":
                vs = "1 (ref)"
            else:
                vs = fmt_ratio(ratio(blk, r["impl"]))
            gf = f"{r['gemm_flops'] / r['median'] / 1e9:,.1f}" if r["gemm_flops"] else "—"
            lines.append(
                f"| {shape_cell} | {dd} | {label} | {fmt_ms(r['median'])} | {iqr} | {r['rounds']} | {vs} | "
                f"{fmt_mib(r['peak_bytes'])} | {gf} | {r['status']} |"
            )
    lines.append("")
    return lines


def memory_check_lines(rows):
    """How the pre-run estimates compared with the measured peaks (they decide the OOM cells)."""
    pairs = [(r, r["est_bytes"] / r["peak_bytes"]) for r in rows if r["median"] is not None and r.get("peak_bytes") and r["est_bytes"]]
    if not pairs:
        return []
    under = [(r, x) for r, x in pairs if x < 1]
    lo = min(pairs, key=lambda p: p[1])
    hi = max(pairs, key=lambda p: p[1])
    lines = [
        "## Memory estimates (decide the OOM cells)",
        "",
        f"Estimated / measured peak over the {len(pairs)} cells that ran: from {lo[1]:.2f} "
        f"({lo[0]['label']}, {lo[0]['shape']}) to {hi[1]:.2f} ({hi[0]['label']}, {hi[0]['shape']}). "
        + (
            "Underestimated cells: "
            + "; ".join(f"{r['label']} {r['shape']} ({x:.2f})" for r, x in under)
            + "."
            if under
            else "No cell was underestimated."
        ),
        "",
    ]
    return lines


# ============================================================================================ chart
def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = []
    for family in ("nst", "fsp", "kd"):
        blocks = shape_blocks(rows, family)
        by_dd = defaultdict(list)
        for (shape, dtype, dev), blk in blocks.items():
            by_dd[(dtype, dev)].append((shape, blk))
        for (dtype, dev), items in by_dd.items():
            panels.append((family, dtype, dev, items))
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(10, 0.95 * max(len(p[3]) for p in panels) + 3), 4.8 * len(panels)), squeeze=False)
    for ax, (family, dtype, dev, items) in zip(axes[:, 0], panels):
        baselines = [i for i in IMPL_ORDER[1:] if any(i in blk["main"] for _, blk in items)]
        width = 0.8 / max(1, len(baselines))
        values = [ratio(blk, i) for _, blk in items for i in baselines]
        finite = [v for v in values if v]
        ymax = max(finite + [10.0]) * 4
        ymin = min(finite + [1.0]) / 2
        for j, impl in enumerate(baselines):
            for x, (shape, blk) in enumerate(items):
                pos = x - 0.4 + width * (j + 0.5)
                row = blk["main"].get(impl)
                if row is None:
                    continue
                v = ratio(blk, impl)
                if v is not None:
                    ax.bar(pos, v - ymin, bottom=ymin, width=width * 0.92, color=BAR_COLORS.get(impl, "gray"))
                    # labels of bars below parity go above the parity line, where they stay readable
                    ax.text(pos, max(v, 1.0) * 1.08, fmt_ratio(v), ha="center", va="bottom", fontsize=7, rotation=90)
                elif is_oom(row):
                    ax.bar(pos, ymax - ymin, bottom=ymin, width=width * 0.92, color="none", edgecolor=BAR_COLORS.get(impl, "gray"), hatch="///", linewidth=0.8)
                    ax.text(pos, ymin * 1.15, "OOM", ha="center", va="bottom", fontsize=7, rotation=90, fontweight="bold")
                else:
                    ax.text(pos, ymin * 1.15, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_yscale("log")
        ax.set_ylim(ymin, ymax)
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([s.replace(" ", "\n") + ("\n(headline)" if blk["tier"] == "headline" else "") for s, blk in items], fontsize=8)
        ax.set_xlim(-0.6, len(items) - 0.4)
        title = {"nst": "NST, poly kernel", "fsp": "FSP", "kd": "Hinton KD loss"}[family]
        ax.set_title(f"{title} ({dtype}, {dev}): forward + backward speed-up of kdfast over each formulation")
        ax.set_ylabel("baseline time / kdfast time (log)\n> 1: kdfast faster")
        ax.grid(axis="y", which="both", alpha=0.25)
        handles = [Patch(color=BAR_COLORS.get(i, "gray"), label=IMPL_LABEL[i]) for i in baselines]
        handles.append(Patch(facecolor="none", edgecolor="black", hatch="///", label="out of memory (not run)"))
        ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=len(handles))
    fig.text(0.01, 0.005, "dashed line: parity with kdfast; bars above it: kdfast faster", fontsize=8)
    fig.tight_layout(rect=(0, 0.015, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================================ main
def trimmed_json(paths_bench, not_run):
    with open(paths_bench[0]) as fh:
        data = json.load(fh)
    for extra in paths_bench[1:]:
        with open(extra) as fh:
            data["benchmarks"].extend(json.load(fh).get("benchmarks", []))
    for b in data.get("benchmarks", []):
        b.get("stats", {}).pop("data", None)
    data.setdefault("kdfast", {})["not_run"] = not_run
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", nargs="+", help="pytest-benchmark JSON file(s) (--benchmark-json)")
    ap.add_argument("--oom", action="append", default=[], help="untimed-case records (conftest --kdfast-oom); repeatable")
    ap.add_argument("--out", required=True, help="output path without extension: writes .md, .png and .json")
    ap.add_argument("--no-json", action="store_true", help="do not write the trimmed <out>.json")
    args = ap.parse_args(argv)

    rows, not_run, machine, meta = load(args.bench, args.oom)
    if not rows:
        sys.exit("no benchmark rows in the input")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    name = os.path.basename(args.out)

    md = machine_header(machine, meta, rows, name)
    # The targets are the NST/FSP ones of the foundation issue: a KD-only run has nothing to judge.
    if any(r["family"] in ("nst", "fsp") for r in rows):
        md += ["## Targets", "", "| target | result | evidence |", "|---|---|---|"]
        for target, verdict, evidence in evaluate_targets(rows):
            md.append(f"| {target} | **{verdict}** | {evidence} |")
        md.append("")
    md += paired_table(args.bench)
    md += family_table(rows, "nst")
    md += family_table(rows, "fsp")
    md += family_table(rows, "kd")
    md += memory_check_lines(rows)
    md.append(f"![speed-up chart]({name}.png)")
    md.append("")
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(md))
    chart(rows, args.out + ".png")
    if not args.no_json:
        # dedupe the records by (group, impl)
        uniq, seen = [], set()
        for rec in not_run:
            key = (rec.get("group"), rec.get("extra_info", {}).get("impl"))
            if key not in seen:
                seen.add(key)
                uniq.append(rec)
        with open(args.out + ".json", "w") as fh:
            json.dump(trimmed_json(args.bench, uniq), fh, indent=1)
    print(f"wrote {args.out}.md, {args.out}.png" + ("" if args.no_json else f", {args.out}.json"))


if __name__ == "__main__":
    main()
