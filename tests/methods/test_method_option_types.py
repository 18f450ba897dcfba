"""Method options are type-checked when the engine is built (issue 26), by one mechanism: each method's
``OPTION_TYPES`` (kdfast.methods.options specs) and the engine's ``ENGINE_TYPES``, checked by
kdfast.methods.check_options. The traps: ``build('bss', ..., clamp=2.5)`` raised "TypeError: 'float'
object is not iterable" and ``epochs=0`` a ZeroDivisionError; BSS with epochs=1 ran plain KD silently."""
import warnings

import pytest
from torch import nn

from kdfast import methods
from kdfast.methods.options import ENGINE_TYPES, OptionError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_bss_clamp_must_be_a_pair():
    with pytest.raises(OptionError) as exc:
        methods.build("bss", Tiny(), Tiny(), clamp=2.5, device="cpu")
    assert str(exc.value) == "method 'bss': option clamp must be a pair of numbers (lo, hi) or None, got 2.5"
    assert isinstance(exc.value, TypeError) and isinstance(exc.value, ValueError)


def test_bss_epochs_zero_names_the_option_not_a_zero_division():
    with pytest.raises(OptionError, match=r"option epochs must be an int >= 1, got 0"):
        methods.build("bss", Tiny(), Tiny(), epochs=0, device="cpu")


@pytest.mark.parametrize("name, options, fragment", [
    ("kd", {"recipe": "kd_xyz"}, "option recipe must be one of 'ce', 'kd', 'kd_nst', 'kd_at', 'kd_fsp', got 'kd_xyz'"),
    ("kd", {"temperature": 0}, "option temperature must be a number > 0, got 0"),
    ("kd", {"alpha": 1.5}, "option alpha must be a number in [0, 1], got 1.5"),
    ("kd", {"lr": "0.1"}, "option lr must be a number > 0, got '0.1'"),          # the engine's keywords too
    ("kd", {"amp": "fp32"}, "option amp must be one of 'bf16', 'fp16' or None, got 'fp32'"),
    ("kd", {"epochs": True}, "option epochs must be an int >= 1, got True"),
    ("bss", {"max_samples": 0}, "option max_samples must be an int >= 1 or None, got 0"),
    ("bss", {"clamp": (2.5, -2.5)}, "option clamp must be a pair of numbers (lo, hi)"),
    ("bss", {"milestones": [0, 3]}, "option milestones must be a list of positive ints (epochs) or None"),
    ("dafl", {"batch_size": 0}, "option batch_size must be an int >= 1, got 0"),
    ("dfad", {"student_steps": 1.5}, "option student_steps must be an int >= 1, got 1.5"),
    ("rdskd", {"generator_epochs": 0}, "option generator_epochs must be an int >= 1"),
    ("kr", {"k": 0}, "option k must be an int >= 1 or None, got 0"),
    ("kr", {"sparse_recoding": "yes"}, "option sparse_recoding must be a bool (true / false), got 'yes'"),
    ("srm", {"target": "both"}, "option target must be one of 'global', 'local', 'global-local'"),
    ("srm", {"input_shape": (16, 16)}, "option input_shape must be (C, H, W) of one input"),
])
def test_bad_option_values_name_the_option_and_its_type(name, options, fragment):
    with pytest.raises(OptionError) as exc:
        methods.check_options(name, options)
    assert fragment in str(exc.value) and str(exc.value).startswith(f"method {name!r}: option ")


@pytest.mark.parametrize("name", methods.available())
def test_every_option_has_a_type_and_its_default_passes(name):
    module = methods.get(name)
    assert set(module.OPTION_TYPES) == set(module.OPTIONS), "each option needs a type in OPTION_TYPES"
    methods.check_options(name, dict(module.OPTIONS))  # the defaults themselves are valid


def test_engine_types_name_real_engine_keywords():
    assert set(ENGINE_TYPES) <= set(methods.engine_options())


def test_yaml_method_option_of_the_wrong_type_is_one_line(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    from kdfast.cli.main import main

    cfg = {"epochs": 1, "device": "cpu", "method": "bss", "method_options": {"clamp": 2.5},
           "teacher": {"name": "lenet5"}, "student": {"name": "lenet5"}, "data": {"name": "digits"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["distill", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kdfast distill: error:")
    assert "option clamp must be a pair of numbers (lo, hi) or None, got 2.5" in err


def test_bss_with_a_schedule_that_switches_its_term_off_warns():
    # epochs=1: beta(e) = 2 max(1 - 4e / 3E, 0) is 0 at e = E = 1, so BSS would run plain KD silently
    with pytest.warns(UserWarning, match="BSS term off for the whole run"):
        engine = methods.build("bss", Tiny(), Tiny(), epochs=1, device="cpu", progress=False)
    engine.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        methods.build("bss", Tiny(), Tiny(), epochs=2, device="cpu", progress=False).close()


def test_docs_list_every_option_with_its_type():
    import os

    from kdfast.methods.options import ENGINE_TYPES

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "docs", "errors-and-resume.md"), encoding="utf-8").read()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| ")}
    for name in methods.available():
        module = methods.get(name)
        for option in module.OPTIONS:
            assert f"`{option}`: {module.OPTION_TYPES[option].what}" in rows[name], (name, option)
    for option, spec in ENGINE_TYPES.items():
        assert f"`{option}`: {spec.what}" in rows["engine"], option
