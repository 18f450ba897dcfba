"""Input builders and launchers shared by the tests."""
import os
import re
import subprocess
import sys

import torch

LAYOUTS = ("contiguous", "channels_last", "strided")

# (N, C, H, W, R_in, R_out, O, (kh, kw), stride, padding, dilation): batch 1, odd sizes, H != W,
# kernel sizes 1/3/5/7 and non-square, strides 1/2 (and mixed), padding 0/1/2/(asymmetric), dilation.
TUCKER_SHAPES = [
    (1, 5, 7, 7, 3, 4, 6, (3, 3), 1, 1, 1),
    (2, 6, 9, 11, 4, 3, 5, (3, 3), 2, 1, 1),
    (2, 4, 8, 8, 2, 2, 3, (1, 1), 1, 0, 1),
    (1, 3, 6, 5, 2, 3, 4, (1, 1), 2, 0, 1),
    (2, 4, 11, 9, 3, 2, 5, (5, 5), 1, 2, 1),
    (1, 3, 13, 12, 2, 3, 3, (7, 7), 2, 3, 1),
    (2, 5, 9, 10, 3, 4, 2, (3, 5), (1, 2), (1, 2), 1),
    (1, 4, 12, 13, 3, 3, 4, (3, 3), 1, 2, 2),
    (2, 3, 10, 7, 2, 2, 3, (3, 3), 2, 0, (2, 1)),
    (3, 6, 5, 5, 4, 4, 6, (3, 3), 1, 0, 1),
    (1, 2, 3, 3, 1, 1, 1, (3, 3), 1, 5, 1),  # padding larger than the image: bands entirely in padding
]


def feature_map(shape, dtype=torch.float64, device="cpu", layout="contiguous", requires_grad=False):
    """A random (B, C, H, W) map in the given memory layout: contiguous, channels_last, or a
    non-contiguous view (every other column of a wider map)."""
    b, c, h, w = shape
    if layout == "contiguous":
        x = torch.randn(shape, dtype=dtype, device=device)
    elif layout == "channels_last":
        x = torch.randn(shape, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn((b, c, h, 2 * w), dtype=dtype, device=device)[..., ::2]
        assert not x.is_contiguous()
    else:
        raise ValueError(layout)
    return x.requires_grad_(requires_grad)


def grads(loss_fn, inputs, grad_out):
    """Gradients of loss_fn(*inputs) w.r.t. every input that requires grad."""
    out = loss_fn(*inputs)
    needed = [x for x in inputs if x.requires_grad]
    return out, torch.autograd.grad(out, needed, grad_out)


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKERS_DIR = os.path.join(TESTS_DIR, "workers")  # scripts the tests run as subprocesses


def load_ranks_assert_identical(out_dir, parts):
    """Load the two workers' rank0.pt / rank1.pt from ``out_dir``, assert every tensor of each state
    dict in ``parts`` is equal on both ranks, and return (rank0, rank1)."""
    r0 = torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(out_dir, "rank1.pt"), weights_only=True)
    for part in parts:
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k} differs between ranks"
    return r0, r1


def run_torchrun(worker: str, out_dir, nproc: int = 2, timeout: int = 180) -> None:
    """Run tests/workers/<worker> with ``torchrun --standalone --nproc_per_node nproc`` (CPU processes, gloo),
    passing ``out_dir`` as its argument; fail with the tail of its output if it does not exit 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS_DIR), TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a launcher around pytest must not leak into the workers' rendezvous
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(WORKERS_DIR, worker), str(out_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------ the user docs (README.md, docs/)
REPO_ROOT = os.path.dirname(TESTS_DIR)
_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


def markdown_files() -> list:
    """README.md and every docs/**/*.md, as paths relative to the repository root, sorted."""
    files = ["README.md"]
    for folder, _, names in os.walk(os.path.join(REPO_ROOT, "docs")):
        files += [os.path.relpath(os.path.join(folder, n), REPO_ROOT) for n in names if n.endswith(".md")]
    return sorted(files)


def read_markdown(rel: str) -> str:
    with open(os.path.join(REPO_ROOT, rel), encoding="utf-8") as f:
        return f.read()


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return len(stripped) >= len(fence) and stripped == fence[0] * len(stripped)


def fenced_blocks(text: str, rel: str) -> list:
    """[(language, line of the block's first code line (1-based), code)] for every fenced block that
    starts a line. An unclosed fence raises ValueError (it would hide the rest of the file)."""
    blocks, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            match = _FENCE.match(line)
            if match:
                fence, language, start, body = match.group(1), match.group(2).lower(), number + 1, []
        elif _closes(line, fence):
            blocks.append((language, start, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    if fence is not None:
        raise ValueError(f"{rel}: the {fence} fence opened at line {start - 1} is never closed")
    return blocks


def markdown_prose(text: str, keep_code_spans: bool = False) -> str:
    """The text outside fenced blocks (and, unless ``keep_code_spans``, outside inline code spans):
    where a [text](target) is a link and a line starting with # is a heading."""
    lines, fence = [], None
    for line in text.splitlines():
        if fence is None:
            match = _FENCE.match(line)
            if match:
                fence = match.group(1)
            else:
                lines.append(line)
        elif _closes(line, fence):
            fence = None
    text = "\n".join(lines)
    return text if keep_code_spans else re.sub(r"(`+).*?\1", "", text, flags=re.S)


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model
