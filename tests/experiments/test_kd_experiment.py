"""kdfast.experiments.kd: the Sadhukhan et al. protocol's ``run`` (the tour's section is tested by tests/cli/test_cli.py)."""
import functools
import json

import pytest

from kdfast.experiments import kd
from kdfast.methods import kd as method


def test_paper_cites_the_icip_2020_authors():
    assert method.PAPER.startswith("Sadhukhan, Saha, Mukhopadhyay, Patra, \"Knowledge Distillation Inspired")
    assert kd.PAPER == method.PAPER and kd.TITLE == method.TITLE


def test_run_tiny_records_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(kd, "DemoConfig", functools.partial(kd.DemoConfig.tiny_config, methods=("ce", "kd")))
    res = kd.run(str(tmp_path), budget="quick", seeds=[4, 5])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["run"]["command"] == f"kdfast experiment kd --dataset digits --budget quick --seeds 4,5 --out {tmp_path} --device cpu"
    assert [r["seed"] for r in res["repeats"]["kd"]] == [4, 5] and saved["data"]["name"] == "digits"
    assert list(res["repeats"]) == ["ce", "kd", "kd_nst", "kd_at", "kd_fsp"]  # the experiment adds KD+FSP
    assert (tmp_path / "report.md").read_text().startswith("# KD fine-tuning of a Tucker-decomposed CNN")
    assert (tmp_path / "student_kd.pt").is_file()


def test_run_needs_consecutive_seeds(tmp_path):
    with pytest.raises(ValueError, match=r"consecutive seeds S, S\+1, ...; got \[0, 2\]"):
        kd.run(str(tmp_path), seeds=[0, 2])
