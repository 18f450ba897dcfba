"""Mutation check of the CUDA emulator suite (tests/ops/test_cuda_emulator.py): applies seeded faults
to copies of csrc/ops/cuda/*.cuh, builds the emulator runner on each mutant and runs the tests of the
kernels that header feeds. Every mutant must fail the suite; the script exits 1 listing any survivor.

Faults: every __syncthreads removed (one at a time), indices shifted, shared allocations shrunk, an
early return before warp shuffles. A mutant is tried on the plain build first and, if that passes, on
the AddressSanitizer + UBSan build (where out-of-bounds shared-memory accesses are caught).

Usage: python tools/emulator_mutants.py [--only SUBSTRING] [--list]
About 4-6 minutes on 2 cores (tests/build/test_emulator_mutants.py runs it under `make test`)."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "emulator"))
import harness  # noqa: E402

TEST_FILE = "tests/ops/test_cuda_emulator.py"
# The tests that exercise each header (pytest -k), float32 / float64 first so a kill comes early.
TESTS_OF = {
    "kernels.cuh": "block_reductions or sum_of_squares or gaussian_rows or normalize_rows_backward or kd_forward or sparse_recoding",
    "kd_loss_kernels.cuh": "block_reductions or kd_forward or kd_backward",
    "sparse_recoding_kernels.cuh": "sparse_recoding",
    "sparse_codes_kernels.cuh": "sparse_codes",
    "tucker_conv2d_kernels.cuh": "tucker",
}

# (name, header, exact text, replacement[, builds]): each text must occur exactly once in the header.
# builds: where the fault can show (default plain, then asan); an out-of-bounds static __shared__
# access is seen by AddressSanitizer only (plain builds keep static shared arrays in one section).
EDITS = [
    # shifted indices
    ("block_sum reads the next warp's partial", "kernels.cuh",
     "value = lane < blockDim.x / kWarp ? shared[lane] : acc_t(0);",
     "value = lane < blockDim.x / kWarp ? shared[lane + 1] : acc_t(0);"),
    ("gaussian_rows diagonal one column off", "kernels.cuh",
     "diag = diag_col0 + r % rows;", "diag = diag_col0 + (r + 1) % rows;"),
    ("normalize_rows_backward dot reads the next position", "kernels.cuh",
     "dot += static_cast<acc_t>(fr[s * fs.position]) * gr[s * gs.position];",
     "dot += static_cast<acc_t>(fr[(s + 1) * fs.position]) * gr[s * gs.position];"),
    ("kd_backward column shifted", "kd_loss_kernels.cuh",
     "const int64_t n = idx / k, i = idx - n * k;", "const int64_t n = idx / k, i = idx - n * k + 1;"),
    ("kd_forward target logit of the next row", "kd_loss_kernels.cuh",
     "ce = row_stats[kd::kLseStudent] - static_cast<acc_t>(sr[y[n]]);",
     "ce = row_stats[kd::kLseStudent] - static_cast<acc_t>(sr[y[n] + s_stride]);"),
    ("recode chunk start off by one", "sparse_recoding_kernels.cuh",
     "const int64_t start = table[layout.chunk_start(c)];", "const int64_t start = table[layout.chunk_start(c)] + 1;"),
    ("update_taus skips the first partial", "sparse_recoding_kernels.cuh",
     "for (int64_t c = first + threadIdx.x; c < last; c += blockDim.x)",
     "for (int64_t c = first + 1 + threadIdx.x; c < last; c += blockDim.x)"),
    ("sparse_codes reads the next pixel", "sparse_codes_kernels.cuh",
     "z += x_cols[q * pixels + p] * __ldg(cj + q);", "z += x_cols[q * pixels + p + 1] * __ldg(cj + q);"),
    ("sparse_codes top-k rows overlap", "sparse_codes_kernels.cuh",
     "acc_t* best_v = reinterpret_cast<acc_t*>(topk_smem) + threadIdx.x * stride;",
     "acc_t* best_v = reinterpret_cast<acc_t*>(topk_smem) + threadIdx.x * (stride - 1);"),
    ("tucker halo row one off", "tucker_conv2d_kernels.cuh",
     "const int ih = ih0 + q / p.halo_w, iw = iw0 + q % p.halo_w;",
     "const int ih = ih0 + 1 + q / p.halo_w, iw = iw0 + q % p.halo_w;"),
    ("tucker stage 2 ignores the column stride", "tucker_conv2d_kernels.cuh",
     "+ tw * p.sw;", "+ tw;"),
    ("tucker stage 3 pixel shifted", "tucker_conv2d_kernels.cuh",
     "for (int ro = 0; ro < p.r_out; ++ro) acc = fmaf(static_cast<float>(l[ro]), z2s[ro * tile + t], acc);",
     "for (int ro = 0; ro < p.r_out; ++ro) acc = fmaf(static_cast<float>(l[ro]), z2s[ro * tile + (t + 1) % tile], acc);"),
    # shrunk shared allocations
    ("sum_of_squares static shared one short", "kernels.cuh",
     "  __shared__ scalar_t shared[kThreads / kWarp];", "  __shared__ scalar_t shared[kThreads / kWarp - 1];",
     ("asan",)),
    ("kd_forward static shared halved", "kd_loss_kernels.cuh",
     "  __shared__ acc_t shared[kThreads / kWarp];", "  __shared__ acc_t shared[kThreads / kWarp / 2];",
     ("asan",)),
    ("tucker dynamic shared without the `first` chunk", "tucker_conv2d_kernels.cuh",
     "+ kChannelChunk * halo + static_cast<size_t>(p.r_in) * kChannelChunk;", "+ kChannelChunk * halo;"),
    ("sparse_codes dynamic shared without the indices", "sparse_codes_kernels.cuh",
     "* (sizeof(acc_t) + sizeof(int32_t));", "* sizeof(acc_t);"),
    # early returns before warp shuffles
    ("block_sum: the last lane of each warp returns before the shuffles", "kernels.cuh",
     "__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* shared) {\n",
     "__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* shared) {\n"
     "  if (threadIdx.x % kWarp == kWarp - 1) return value;\n"),
    ("block_max: lane 0 of warp 0 returns before the second shuffle round", "kd_loss_kernels.cuh",
     "  if (warp == 0) {\n    value = lane < blockDim.x / kWarp ? shared[lane] : -std::numeric_limits<acc_t>::infinity();",
     "  if (warp == 0) {\n    if (lane == 0) return value;\n"
     "    value = lane < blockDim.x / kWarp ? shared[lane] : -std::numeric_limits<acc_t>::infinity();"),
]


def mutants():
    """(name, header, mutated text, builds) for every fault."""
    out = []
    for path in sorted(harness.KERNEL_DIR.glob("*.cuh")):
        text = path.read_text()
        for i, m in enumerate(re.finditer(r"[ \t]*__syncthreads\(\);[^\n]*\n", text)):
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"remove __syncthreads #{i + 1} ({path.name}:{line})", path.name,
                        text[:m.start()] + text[m.end():], ("plain", "asan")))
    for name, header, old, new, *builds in EDITS:
        text = (harness.KERNEL_DIR / header).read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {name!r}: the text to mutate occurs {text.count(old)} times in {header} "
                             f"(update tools/emulator_mutants.py with the kernel)")
        out.append((name, header, text.replace(old, new), builds[0] if builds else ("plain", "asan")))
    return out


def suite_fails(exe: Path, variant: str, header: str) -> tuple[bool, str]:
    env = dict(os.environ, KDFAST_EMULATOR_EXE=str(exe), KDFAST_EMULATOR_VARIANT=variant,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pytest", TEST_FILE, "-x", "-q", "-p", "no:cacheprovider",
                           "-k", TESTS_OF[header]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"pytest exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    first = next((line for line in proc.stdout.splitlines() if line.startswith("FAILED")), "")
    return proc.returncode == 1, first


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    todo = [m for m in mutants() if args.only is None or args.only in m[0]]
    if args.list:
        for name, header, _, _ in todo:
            print(f"{header}: {name}")
        return 0
    base = {v: harness.build(v) for v in ("plain", "asan")}
    survivors = []
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="kdfast-mutants-") as tmp:
        for index, (name, header, text, builds) in enumerate(todo):
            kernel_dir = Path(tmp, f"m{index}", "cuda")
            kernel_dir.mkdir(parents=True)
            for path in harness.KERNEL_DIR.glob("*.cuh"):
                shutil.copy(path, kernel_dir / path.name)
            (kernel_dir / header).write_text(text)
            verdict = None
            for variant in builds:
                exe = harness.build(variant, kernel_dir=kernel_dir, out_dir=Path(tmp, f"m{index}", variant),
                                    reuse_from=base[variant].parent)
                failed, first = suite_fails(exe, variant, header)
                if failed:
                    verdict = f"killed ({variant}): {first.removeprefix('FAILED ')[:150]}"
                    break
            if verdict is None:
                verdict = "SURVIVED"
                survivors.append(name)
            print(f"[{time.time() - start:5.0f}s] {header}: {name}: {verdict}", flush=True)
            shutil.rmtree(Path(tmp, f"m{index}"), ignore_errors=True)
    print(f"{len(todo) - len(survivors)}/{len(todo)} mutants killed")
    if survivors:
        print("SURVIVORS (the emulator suite does not notice these faults):\n  " + "\n  ".join(survivors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
