"""Every ```python block of README.md and of docs/**/*.md runs as written, so the documentation cannot
drift from the API. One test per file: its blocks run in order in one namespace (a page may build on
its earlier blocks), in a temporary working directory, with one torch thread. A failure names the
file and the line where the failing block starts. Blocks not meant to run are marked ```text,
```bash, ```yaml, never ```python."""
import pytest
import torch

from helpers import fenced_blocks, markdown_files, read_markdown

FILES = markdown_files()
# Optional dependencies a page may use: tensorly (Tucker decomposition) and the kdfast[export] extra.
OPTIONAL = ("tensorly", "onnx", "onnxscript", "onnxruntime")


def python_blocks(rel: str) -> list:
    return [(line, code) for language, line, code in fenced_blocks(read_markdown(rel), rel) if language == "python"]


def test_docs_have_python_snippets():
    assert "README.md" in FILES and any(f.startswith("docs") for f in FILES)
    assert len(python_blocks("README.md")) >= 3, "README's API tour should show runnable python"


@pytest.mark.parametrize("rel", FILES)
def test_python_blocks_run(rel, tmp_path, monkeypatch):
    blocks = python_blocks(rel)
    if not blocks:
        pytest.skip(f"{rel} has no python block")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_snippet"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line, code in blocks:
            # Leading newlines put the code at its line of the Markdown file, so tracebacks point there.
            compiled = compile("\n" * (line - 1) + code, rel, "exec")
            try:
                exec(compiled, namespace)
            except ModuleNotFoundError as exc:
                missing = (exc.name or "").split(".")[0]
                if missing in OPTIONAL:  # optional dependency: skip, as conftest does for tensorly
                    pytest.skip(f"{rel}: the python block at line {line} needs {missing}, which is not installed")
                raise AssertionError(f"{rel}: the python block at line {line} failed: {exc!r}") from exc
            except Exception as exc:
                raise AssertionError(f"{rel}: the python block at line {line} failed: {exc!r}") from exc
    finally:
        torch.set_num_threads(threads)
