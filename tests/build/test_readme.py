"""Every ```python block of README.md runs as written (each in a fresh namespace, in a temporary
working directory), so the README cannot drift from the API."""
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCKS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(), re.S)


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch, capsys):
    code = BLOCKS[index]
    if "decompose(" in code:
        pytest.importorskip("tensorly")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})
    finally:
        torch.set_num_threads(threads)
