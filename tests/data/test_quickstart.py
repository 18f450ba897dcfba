"""docs/quickstart.md: the quick start fits in 25 lines and runs as written on a folder of generated PNG
images (tests/build/test_docs_snippets.py runs the page's own blocks too, with its random images)."""
import numpy as np
import pytest
import torch

from helpers import fenced_blocks, read_markdown
from own_data_files import write_png_folder

PAGE = "docs/quickstart.md"


def _quick_start() -> tuple:
    text = read_markdown(PAGE)
    after = text.index("## The quick start")
    line = text[:after].count("\n") + 1
    blocks = [(start, code) for language, start, code in fenced_blocks(text, PAGE) if language == "python"]
    return next((start, code) for start, code in blocks if start > line)


def test_quick_start_is_at_most_25_lines():
    _, code = _quick_start()
    assert len(code.strip().splitlines()) <= 25


def test_quick_start_runs_on_a_folder_of_images(tmp_path, monkeypatch):
    pytest.importorskip("tensorly", reason="kdfast.decompose needs tensorly")
    write_png_folder(tmp_path / "my_images", np.random.RandomState(0), n_per_class=12, size=32, mode="RGB")
    monkeypatch.chdir(tmp_path)
    start, code = _quick_start()
    namespace = {"__name__": "quickstart"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile("\n" * (start - 1) + code, PAGE, "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    from kdfast.nn import TuckerConv2d

    student, train = namespace["student"], namespace["train"]
    assert train.dataset.classes == ("cat", "dog", "frog") and train.dataset.name == "folder"
    assert any(isinstance(m, TuckerConv2d) for m in student.modules())
    history = namespace["history"]
    assert len(history) == 3 and 0 <= history[-1]["eval_accuracy"] <= 1
