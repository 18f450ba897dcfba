"""YAML run configs: any registered method on the engine (``kdfast distill --config run.yaml``).

Example (every section but ``student``, ``data`` and ``losses`` is optional; with ``method`` the losses
come from the method and ``losses`` is optional)::

    method: kd                  # optional: a registered method (kdfast.methods.available()): kd, kr, ...
    method_options: {recipe: kd_nst}   # that method's options (kdfast.methods.get(name).OPTIONS)
    seed: 0
    epochs: 240
    max_steps: null             # stop after this many optimiser steps in all (resumable; null: no limit)
    device: cuda                # default: cuda if available
    amp: bf16                   # null | bf16 | fp16
    teacher:                    # null: no teacher (only task losses, e.g. to train the teacher itself)
      name: resnet56            # kdfast.models.build(name, **other keys)
      weights: runs/teacher/last.pt   # a state dict, or a kdfast checkpoint (its "student" entry);
                                      # relative paths are relative to the YAML file
    student: {name: resnet20}   # num_classes / in_channels default to the dataset's
    # or the Tucker-decomposed teacher (kdfast.decompose(teacher, **decompose)):
    # student: {decompose: {ranks: evbmf}}
    data:                       # kdfast.data.loaders(name, root, batch_size, ...); docs/data.md
      name: cifar100            # digits | mnist | fashion-mnist | cifar10 | cifar100 | folder | npz | idx
      root: /data/cifar         # relative paths are relative to the YAML file; optional for named datasets
      batch_size: 64            # per process under torchrun
      subset: null              # train on this many images (class-stratified, drawn with subset_seed) ...
      fraction: null            # ... or on this share of each class; test_subset / test_fraction: the test split
    losses:                     # name: {type, weight, [student_layers, teacher_layers], constructor kwargs}
      kd: {type: KDLoss, temperature: 4, alpha: 0.9}   # 0.1 CE + 0.9 T^2 KL (RepDistiller's recipe)
      nst: {type: NSTLoss, weight: 50, student_layers: [layer3], teacher_layers: [layer3]}
    optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4, nesterov: false}
    schedule: {name: step, milestones: [150, 180, 210], gamma: 0.1}
    checkpoint: {dir: runs/kd, every: 1, keep: false, resume: true}   # resume: force = despite a changed config
    log: {path: runs/kd/metrics.jsonl, every: 50, progress: true}
    train: {grad_clip: null, cache_teacher_logits: false, compile: false, sync_bn: false}
    save_student: runs/kd/student.pt   # final student state dict (atomic write)

Loss ``type`` is a class name from ``kdfast.losses`` or ``torch.nn`` (case-insensitive; the ``Loss``
suffix may be dropped: ``kd``, ``nst``, ``cross_entropy``). Unknown keys anywhere are errors that name
the key and list the valid ones.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

# section -> {key: (accepted types, default)}; None as default means optional.
_NUM = (int, float)
_SCHEMA: Dict[str, Dict[str, Tuple[tuple, Any]]] = {
    "data": {
        "name": ((str,), "digits"), "root": ((str, type(None)), None), "batch_size": ((int,), 64),
        "test_batch_size": ((int, type(None)), None), "image_size": ((int, type(None)), None),
        "normalize": ((bool,), True), "augment": ((bool,), False), "num_workers": ((int,), 0),
        "subset": ((int, type(None)), None), "fraction": (_NUM + (type(None),), None),
        "test_subset": ((int, type(None)), None), "test_fraction": (_NUM + (type(None),), None),
        "subset_seed": ((int,), 0),
    },
    "optimizer": {
        "name": ((str,), "sgd"), "lr": (_NUM, 0.05), "momentum": (_NUM, 0.9), "weight_decay": (_NUM, 5e-4),
        "nesterov": ((bool,), False),
    },
    "schedule": {"name": ((str,), "step"), "milestones": ((list,), None), "gamma": (_NUM, 0.1)},
    "checkpoint": {"dir": ((str,), None), "every": ((int,), 1), "keep": ((bool,), False),
                   "resume": ((bool, str), False)},
    "log": {"path": ((str, type(None)), None), "every": ((int,), 50), "progress": ((bool,), True)},
    "train": {"grad_clip": (_NUM + (type(None),), None), "cache_teacher_logits": ((bool,), False),
              "compile": ((bool,), False), "sync_bn": ((bool,), False)},
}
_TOP: Dict[str, Tuple[tuple, Any]] = {
    "seed": ((int,), 0), "epochs": ((int,), 1), "max_steps": ((int, type(None)), None),
    "device": ((str, type(None)), None),
    "amp": ((str, type(None)), None), "teacher": ((dict, type(None)), None), "student": ((dict,), None),
    "data": ((dict,), None), "losses": ((dict,), None), "optimizer": ((dict,), None),
    "schedule": ((dict, type(None)), None), "checkpoint": ((dict, type(None)), None), "log": ((dict,), None),
    "train": ((dict,), None), "save_student": ((str, type(None)), None),
    "method": ((str, type(None)), None), "method_options": ((dict,), None),
}
_REQUIRED_TOP = ("student", "data")
_MODEL_KEYS = ("name", "weights")  # other keys of teacher/student are kwargs of kdfast.models.build
_LOSS_KEYS = ("type", "weight", "student_layers", "teacher_layers")  # others: loss constructor kwargs


class ConfigError(ValueError):
    """A config file that does not validate (a ValueError naming the offending key)."""


def _type_names(types) -> str:
    names = {int: "int", float: "number", str: "string", bool: "bool", list: "list", dict: "mapping",
             type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _check_type(where: str, value, types) -> None:
    # bool is an int in Python; don't accept true for an int field (or 1 for a bool field).
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{where} must be {_type_names(types)}, got {value!r}")


def _check_keys(where: str, given: Mapping, valid) -> None:
    unknown = [k for k in given if k not in valid]
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; valid keys: {', '.join(valid)}")


def validate_config(cfg: Any) -> Dict[str, Any]:
    """Check a config dict and fill defaults; returns a new dict. Raises ConfigError (a ValueError)."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(cfg).__name__}")
    cfg = copy.deepcopy(dict(cfg))
    path = cfg.pop("_path", None)  # where load_config read it (kept for the model checkpoint's record)
    _check_keys("the config", cfg, list(_TOP))
    missing = [k for k in _REQUIRED_TOP if k not in cfg]
    if missing:
        raise ConfigError(f"missing required key {missing[0]!r} in the config (required: {', '.join(_REQUIRED_TOP)})")
    out: Dict[str, Any] = {"_path": path}
    for key, (types, default) in _TOP.items():
        value = cfg.get(key, default)
        if key in cfg:
            _check_type(key, value, types)
        out[key] = value
    if out["epochs"] < 1:
        raise ConfigError(f"epochs must be >= 1, got {out['epochs']}")
    if out["max_steps"] is not None and out["max_steps"] < 1:
        raise ConfigError(f"max_steps must be >= 1 (optimiser steps in all) or null, got {out['max_steps']}")
    if out["amp"] not in (None, "bf16", "fp16"):
        raise ConfigError(f"amp must be null, 'bf16' or 'fp16', got {out['amp']!r}")
    for section, fields in _SCHEMA.items():
        given = cfg.get(section, {} if section not in ("schedule", "checkpoint") else None)
        if given is None:
            out[section] = None
            continue
        _check_keys(section, given, list(fields))
        filled = {}
        for key, (types, default) in fields.items():
            if key in given and not (given[key] is None and default is None):  # null = "use the default"
                _check_type(f"{section}.{key}", given[key], types)
            filled[key] = given.get(key, default)
        out[section] = filled
    _check_data(out["data"])
    if out["schedule"] is not None:
        sched = out["schedule"]
        if sched["name"] not in ("step", "cosine", "cosine_steps"):
            raise ConfigError(f"schedule.name must be 'step', 'cosine' or 'cosine_steps', got {sched['name']!r}")
        if sched["name"] == "step" and not sched["milestones"]:
            raise ConfigError("schedule.milestones is required for schedule.name 'step' (a list of epochs)")
        if sched["milestones"] is not None and not all(
                isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in sched["milestones"]):
            raise ConfigError(f"schedule.milestones must be a list of positive ints, got {sched['milestones']!r}")
    if out["optimizer"]["name"] not in ("sgd", "adam"):
        raise ConfigError(f"optimizer.name must be 'sgd' or 'adam', got {out['optimizer']['name']!r}")
    if out["train"]["cache_teacher_logits"] and out["data"]["augment"]:
        raise ConfigError("train.cache_teacher_logits needs data.augment: false (cached teacher logits would "
                          "belong to another augmented view than the student sees)")
    if out["checkpoint"] is not None and out["checkpoint"]["dir"] is None:
        raise ConfigError("checkpoint.dir is required when a checkpoint section is given")
    student = out["student"]
    if "decompose" in student:
        extra = [k for k in student if k not in ("decompose", "weights")]
        if extra:
            raise ConfigError(f"unknown key {extra[0]!r} in student with decompose; valid keys: decompose, weights")
        _check_type("student.decompose", student["decompose"], (dict,))
        if out["teacher"] is None:
            raise ConfigError("student.decompose needs a teacher (the student is the decomposed teacher)")
    for role in ("teacher", "student"):
        spec = out[role]
        if spec is None or (role == "student" and "decompose" in spec):
            continue
        if "name" not in spec or not isinstance(spec["name"], str):
            raise ConfigError(f"{role}.name is required (a model name for kdfast.models.build)")
        if "weights" in spec:
            _check_type(f"{role}.weights", spec["weights"], (str, type(None)))
    out["method_options"] = out["method_options"] or {}
    if out["method"] is not None:
        from .. import methods

        try:
            methods.check_options(out["method"], out["method_options"])
        except ValueError as e:
            raise ConfigError(f"method: {e}") from None
        if out["method"] != "kd" and out["teacher"] is None:
            raise ConfigError(f"method {out['method']!r} needs a teacher")
    elif out["method_options"]:
        raise ConfigError("method_options needs method (a registered method name)")
    out["losses"] = out["losses"] or {}
    if not out["losses"] and out["method"] is None:
        raise ConfigError("losses must name at least one loss (or set method to a registered method)")
    for name, spec in out["losses"].items():
        where = f"losses.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a mapping with at least 'type', got {spec!r}")
        if "type" not in spec or not isinstance(spec["type"], str):
            raise ConfigError(f"{where}.type is required (a loss class name, e.g. KDLoss or CrossEntropyLoss)")
        _check_type(f"{where}.weight", spec.get("weight", 1.0), _NUM)
        has_s, has_t = "student_layers" in spec, "teacher_layers" in spec
        if has_s != has_t:
            raise ConfigError(f"{where} needs both student_layers and teacher_layers (or neither)")
        for k in ("student_layers", "teacher_layers"):
            if k in spec:
                _check_type(f"{where}.{k}", spec[k], (str, list))
    return out


def _check_data(d: Dict[str, Any]) -> None:
    """The data section's values (types are checked already): a known name, a root for own data, subsets."""
    from .. import data as kd_data

    if d["name"] not in kd_data.NAMES:
        raise ConfigError(f"data.name must be one of {', '.join(kd_data.NAMES)}, got {d['name']!r}")
    if d["name"] in kd_data.FORMATS and d["root"] is None:
        raise ConfigError(f"data.root is required for data.name {d['name']!r} (the folder or file of your data)")
    for which in ("", "test_"):
        subset, fraction = d[which + "subset"], d[which + "fraction"]
        if subset is not None and subset < 1:
            raise ConfigError(f"data.{which}subset must be >= 1 (a number of images) or null, got {subset}")
        if fraction is not None and not 0 < fraction <= 1:
            raise ConfigError(f"data.{which}fraction must be in (0, 1] (a share of each class) or null, got {fraction}")
        if subset is not None and fraction is not None:
            raise ConfigError(f"give data.{which}subset or data.{which}fraction, not both")
    if d["subset_seed"] < 0:
        raise ConfigError(f"data.subset_seed must be >= 0, got {d['subset_seed']}")


def load_config(path) -> Dict[str, Any]:
    """Read a YAML config with ``yaml.safe_load`` and validate it (see the module docstring)."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    try:
        cfg = validate_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    for role in ("teacher", "student"):  # weights are relative to the YAML file, not the working directory
        spec = cfg[role]
        if spec and isinstance(spec.get("weights"), str) and not os.path.isabs(spec["weights"]):
            spec["weights"] = os.path.join(base, spec["weights"])
    root = cfg["data"]["root"]  # and so is the data's root
    if isinstance(root, str) and not os.path.isabs(os.path.expanduser(root)):
        cfg["data"]["root"] = os.path.join(base, root)
    elif isinstance(root, str):
        cfg["data"]["root"] = os.path.expanduser(root)
    cfg["_path"] = os.path.abspath(path)
    return cfg


def resolve_loss_class(type_name: str):
    """A loss class by name from kdfast.losses (first) or torch.nn; case-insensitive, 'Loss' optional."""
    def key(name: str) -> str:
        k = name.lower().replace("_", "")
        return k[:-4] if k.endswith("loss") and len(k) > 4 else k

    table: Dict[str, type] = {}
    for name in dir(torch.nn.modules.loss):
        obj = getattr(torch.nn.modules.loss, name)
        if isinstance(obj, type) and issubclass(obj, nn.Module) and name.endswith("Loss") and not name.startswith("_"):
            table[key(name)] = obj
    try:
        from kdfast import losses as kd_losses
    except ImportError:
        kd_losses = None
    if kd_losses is not None:
        for name in dir(kd_losses):
            obj = getattr(kd_losses, name)
            if isinstance(obj, type) and issubclass(obj, nn.Module) and not name.startswith("_"):
                table[key(name)] = obj  # kdfast's own classes win over torch.nn's
    found = table.get(key(type_name))
    if found is None:
        names = sorted({c.__name__ for c in table.values()})
        raise ConfigError(f"unknown loss type {type_name!r}; available: {', '.join(names)}")
    return found


def _build_model(role: str, spec: Mapping[str, Any], dataset) -> nn.Module:
    from kdfast import models

    kwargs = {k: v for k, v in spec.items() if k not in _MODEL_KEYS}
    kwargs.setdefault("num_classes", getattr(dataset, "num_classes", 10))
    if hasattr(dataset, "in_channels"):
        kwargs.setdefault("in_channels", dataset.in_channels)
    try:
        model = models.build(spec["name"], **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{role}: {e}") from None
    if spec.get("weights"):
        _load_weights(role, model, spec["weights"], spec["name"])
    return model


def _load_weights(role: str, model: nn.Module, weights: str, name: str) -> None:
    if not os.path.isfile(weights):
        raise ConfigError(f"{role}.weights: no such file {weights!r}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unsafe pickle: all unreadable here
        raise ConfigError(f"{role}.weights {weights!r} cannot be read as a torch state dict or kdfast checkpoint "
                          f"(empty, truncated or another format): {type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(state, Mapping) and str(state.get("format", "")).startswith("kdfast.distill"):
        state = state["student"]  # a kdfast checkpoint: the trained model is its "student"
    elif isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ConfigError(f"{role}.weights {weights!r} holds a {type(state).__name__}, not a state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: name the first one, not the whole state dict
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise ConfigError(f"{role}.weights {weights} does not fit {name}: {first[:300]}; weights of another "
                          "architecture?") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise ConfigError(
            f"{role}.weights {weights} does not fit {name}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"keys (e.g. missing {missing[:3]}, unexpected {unexpected[:3]}); weights of another architecture?")


def _decomposed_student(teacher: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """The paper-000 student: the (trained) teacher with its convolutions Tucker-2 decomposed
    (``kdfast.decompose(teacher, **spec["decompose"])``, e.g. ``{ranks: evbmf}``), then fine-tuned by KD.
    Deterministic (HOSVD/EVBMF), so a resumed run rebuilds the same shapes before loading its checkpoint."""
    import kdfast

    try:
        student, _report = kdfast.decompose(teacher, **spec["decompose"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"student.decompose: {e}") from None
    if student is teacher:
        raise ConfigError("student.decompose: inplace=True would make the student the teacher itself")
    if spec.get("weights"):
        _load_weights("student", student, spec["weights"], "the decomposed teacher")
    return student


def build_from_config(cfg: Mapping[str, Any]):
    """Models, data and losses from a validated config -> ``(distiller, (train_loader, eval_loader))``."""
    from kdfast import data as kd_data

    from ..distill import Distiller

    from ..distill import seed_everything

    cfg = validate_config(cfg)  # idempotent: fills defaults, so a dict literal works too
    # Seed before any model is built: a from-scratch student's initial weights depend on it.
    seed_everything(cfg["seed"])
    d = cfg["data"]
    try:
        train_loader, eval_loader = kd_data.loaders(
            d["name"], d["root"], batch_size=d["batch_size"], test_batch_size=d["test_batch_size"],
            image_size=d["image_size"], normalize=d["normalize"], augment=d["augment"],
            return_index=cfg["train"]["cache_teacher_logits"], num_workers=d["num_workers"], seed=cfg["seed"],
            subset=d["subset"], fraction=d["fraction"], test_subset=d["test_subset"], test_fraction=d["test_fraction"],
            subset_seed=d["subset_seed"],
        )
    except FileNotFoundError as e:  # a wrong data.root: one line naming the key, not a traceback
        raise ConfigError(f"data.root: {e}") from None
    dataset = train_loader.dataset
    teacher = _build_model("teacher", cfg["teacher"], dataset) if cfg["teacher"] is not None else None
    if "decompose" in cfg["student"]:
        student = _decomposed_student(teacher, cfg["student"])
    else:
        student = _build_model("student", cfg["student"], dataset)

    losses, feature_layers = {}, {}
    for name, spec in cfg["losses"].items():
        cls = resolve_loss_class(spec["type"])
        kwargs = {k: v for k, v in spec.items() if k not in _LOSS_KEYS}
        try:
            module = cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"losses.{name}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                              f"failed: {e}") from None
        losses[name] = (module, float(spec.get("weight", 1.0)))
        if "student_layers" in spec:
            feature_layers[name] = (spec["student_layers"], spec["teacher_layers"])

    opt, sched, ck, log, train = cfg["optimizer"], cfg["schedule"], cfg["checkpoint"], cfg["log"], cfg["train"]
    engine = dict(
        optimizer=opt["name"], lr=float(opt["lr"]), momentum=float(opt["momentum"]),
        weight_decay=float(opt["weight_decay"]), nesterov=opt["nesterov"],
        schedule=sched["name"] if sched else None, milestones=sched["milestones"] if sched else None,
        gamma=float(sched["gamma"]) if sched else 0.1,
        epochs=cfg["epochs"], max_steps=cfg["max_steps"], device=cfg["device"], amp=cfg["amp"], seed=cfg["seed"],
        grad_clip=train["grad_clip"], cache_teacher_logits=train["cache_teacher_logits"],
        compile=train["compile"], sync_bn=train["sync_bn"],
        checkpoint_dir=ck["dir"] if ck else None, checkpoint_every=ck["every"] if ck else 1,
        keep_checkpoints=ck["keep"] if ck else False, resume=ck["resume"] if ck else False,
        log_path=log["path"], log_every=log["every"], progress=log["progress"],
    )
    try:
        if cfg["method"] is not None:
            from .. import methods

            options = dict(cfg["method_options"])
            if cfg["method"] == "kr" and "example_input" not in options:
                options["example_input"] = next(iter(train_loader))[0][:2]
            if losses and cfg["method"] != "kd":
                options["losses"] = losses
            distiller = methods.build(cfg["method"], teacher, student, **options, **engine)
        else:
            distiller = Distiller(teacher, student, losses, feature_layers=feature_layers or None, **engine)
    except (TypeError, ValueError) as e:
        raise ConfigError(_yaml_names(str(e))) from None
    distiller.record_config("yaml", resume_record(cfg))
    return distiller, (train_loader, eval_loader)


# YAML keys that may change between a run and its resumption (where it runs, what it prints, where the
# data lives): every other key is recorded in the checkpoints, and a resumed run must match them.
# max_steps is neutral: re-running with a larger max_steps (or none) is how a stopped run continues.
_RESUME_NEUTRAL = ("_path", "device", "log", "save_student", "checkpoint.resume", "checkpoint.every",
                   "checkpoint.keep", "data.root", "data.num_workers", "data.test_batch_size", "train.compile",
                   "max_steps")


def resume_record(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of a validated config that a checkpoint records and a resumed run must match."""
    record = copy.deepcopy(dict(cfg))
    for key in _RESUME_NEUTRAL:
        section, _, field = key.partition(".")
        if not field:
            record.pop(section, None)
        elif isinstance(record.get(section), dict):
            record[section].pop(field, None)
    return record


# Engine argument names as the YAML spells them (for errors found while building the run).
_YAML_NAMES = {"feature_layers": "losses.<name>.student_layers / teacher_layers", "amp=": "amp: ",
               "grad_clip": "train.grad_clip", "lr must": "optimizer.lr must", "sync_bn": "train.sync_bn",
               "cache_teacher_logits": "train.cache_teacher_logits"}


def _yaml_names(message: str) -> str:
    for python, yaml_name in _YAML_NAMES.items():
        message = message.replace(python, yaml_name)
    return message


def run_config(path_or_cfg, model_out=None) -> list:
    """Load (if a path), build and fit; returns the history.

    With ``save_student``: the student's state dict is written there, and a model checkpoint
    (kdfast.model_file: architecture, kwargs, Tucker structure, weights; what ``kdfast robustness`` and
    ``kdfast decompose`` read) at ``model_out`` (default ``<save_student without .pt>_model.pt``).
    """
    from .. import model_file
    from ..distill.checkpoint import atomic_save
    from ..distill.tap import unwrap_model

    cfg = load_config(path_or_cfg) if isinstance(path_or_cfg, (str, os.PathLike)) else validate_config(path_or_cfg)
    distiller, (train_loader, eval_loader) = build_from_config(cfg)
    try:
        history = distiller.fit(train_loader, cfg["epochs"], eval_loader=eval_loader)
        if cfg["save_student"] and distiller.is_main:
            student = unwrap_model(distiller.student)
            atomic_save(student.state_dict(), cfg["save_student"])
            name, kwargs = model_spec(cfg, train_loader.dataset)
            # what the model was trained on and expects: the dataset's own name, shape, classes, normalisation
            data_info = train_loader.dataset.record()
            out = model_out or os.path.splitext(cfg["save_student"])[0] + "_model.pt"
            model_file.save_model(out, student, name, kwargs, data_info,
                                  {"config": cfg.get("_path"), "method": cfg["method"]})
    finally:
        distiller.close()
    return history


def model_spec(cfg: Mapping[str, Any], dataset) -> Tuple[str, Dict[str, Any]]:
    """(kdfast.models name, kwargs) of the config's student architecture: for a decomposed student, the
    teacher's (its Tucker layers are recorded separately by kdfast.model_file)."""
    spec = cfg["teacher"] if "decompose" in cfg["student"] else cfg["student"]
    kwargs = {k: v for k, v in spec.items() if k not in _MODEL_KEYS}
    kwargs.setdefault("num_classes", getattr(dataset, "num_classes", 10))
    if hasattr(dataset, "in_channels"):
        kwargs.setdefault("in_channels", dataset.in_channels)
    return spec["name"], kwargs
