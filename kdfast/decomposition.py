"""Model-wide Tucker-2 decomposition: replace eligible nn.Conv2d layers by :class:`~kdfast.nn.TuckerConv2d`.

    student, report = kdfast.decompose(teacher, ranks="evbmf", input_shape=(3, 32, 32))
    print(report)              # per-layer table: ranks, params and MACs before/after, totals
    json.dump(report.to_dict(), f)

Which convs are decomposed (all rules apply together):
  * plain ``nn.Conv2d`` only (subclasses may change forward; they are skipped), groups = 1,
    padding_mode = "zeros", and padding that TuckerConv2d can express;
  * not 1x1 (``skip_1x1=True``: a 1x1 conv gains nothing from a Tucker-2 split);
  * not the first conv in module registration order, normally the stem (``skip_first=True``:
    decomposing the input layer hurts accuracy most and saves least, Kim et al. 2016);
  * in_channels >= min_channels and out_channels >= min_channels;
  * ``include`` (None = every conv): its fully qualified name (as in ``model.named_modules()``) matches
    at least one fnmatch pattern, e.g. ``"layer3.*"``; ``exclude``: it matches none. include only
    narrows the selection; use skip_first=False / skip_1x1=False / min_channels=1 to widen it.
Every skipped conv is listed in ``report.skipped`` with the reason.
"""
from __future__ import annotations

import copy
import fnmatch
import numbers
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import _checks
from .nn import _RANK_OPTIONS, TuckerConv2d, _conv_padding, resolve_ranks


@dataclass
class LayerReport:
    """One decomposed conv. MACs (multiply-accumulates; FLOPs ~= 2 x MACs, bias ignored) are per
    sample when the report was measured with an input, else per output pixel (see macs_unit)."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple
    stride: tuple
    ranks: tuple
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    input_size: tuple | None = None  # (H, W) seen in the measuring forward
    output_size: tuple | None = None
    # keep_dense_if_slower: median latencies (ms) of the dense conv (BN-folded: with bias) and of the
    # Tucker layer at the layer's real input (batch, size, memory format), timed in alternation.
    dense_ms: float | None = None
    tucker_ms: float | None = None
    # ranks="evbmf": the ranks EVBMF chose, before weaken / min_rank / alignment changed them
    evbmf_ranks: tuple | None = None


@dataclass
class DecompositionReport:
    layers: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # [(name, reason)]
    model_params_before: int = 0
    model_params_after: int = 0
    macs_unit: str = "per output pixel"  # or "per sample" (measured with an input)
    # keep_dense_if_slower: convs that were decomposed and timed but kept dense (Tucker not faster),
    # and the whole-model latencies (ms): measured teacher, predicted student (teacher minus the
    # per-layer savings), measured student; both models fused for inference (kdfast.fuse_for_inference).
    kept_dense: list = field(default_factory=list)
    latency: dict | None = None

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    # Totals exist only for per-sample MACs: per-output-pixel counts of layers at different
    # resolutions do not add up to anything meaningful.
    @property
    def macs_before(self) -> int | None:
        return self._total("macs_before")

    @property
    def macs_after(self) -> int | None:
        return self._total("macs_after")

    def _total(self, key: str) -> int | None:
        values = [getattr(layer, key) for layer in self.layers]
        if self.macs_unit != "per sample" or any(v is None for v in values):
            return None
        return sum(values)

    def to_dict(self) -> dict:
        """JSON-ready: per-layer dicts, skipped convs, totals (FLOPs = 2 x MACs)."""
        layers = []
        for layer in self.layers:
            d = asdict(layer)
            for key in ("kernel_size", "stride", "ranks", "input_size", "output_size", "evbmf_ranks"):
                d[key] = None if d[key] is None else list(d[key])
            d["flops_before"] = None if layer.macs_before is None else 2 * layer.macs_before
            d["flops_after"] = None if layer.macs_after is None else 2 * layer.macs_after
            layers.append(d)
        kept = []
        for layer in self.kept_dense:
            d = asdict(layer)
            for key in ("kernel_size", "stride", "ranks", "input_size", "output_size", "evbmf_ranks"):
                d[key] = None if d[key] is None else list(d[key])
            kept.append(d)
        return {
            "macs_unit": self.macs_unit,
            "layers": layers,
            "kept_dense": kept,
            "latency": self.latency,
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "totals": {
                "decomposed_layers": len(self.layers),
                "layer_params_before": self.params_before,
                "layer_params_after": self.params_after,
                "layer_macs_before": self.macs_before,
                "layer_macs_after": self.macs_after,
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
            },
        }

    def __str__(self) -> str:
        header = ("layer", "shape (O, C, kh, kw)", "ranks", "params", "params'", "MACs", "MACs'", "MAC ratio")
        rows = []
        for layer in self.layers:
            ratio = "-" if not layer.macs_after else f"{layer.macs_before / layer.macs_after:.2f}x"
            ranks = f"({layer.ranks[0]}, {layer.ranks[1]})"
            if layer.evbmf_ranks is not None and tuple(layer.evbmf_ranks) != tuple(layer.ranks):
                ranks += f" EVBMF ({layer.evbmf_ranks[0]}, {layer.evbmf_ranks[1]})"
            rows.append((
                layer.name,
                f"({layer.out_channels}, {layer.in_channels}, {layer.kernel_size[0]}, {layer.kernel_size[1]})",
                ranks,
                f"{layer.params_before:,}", f"{layer.params_after:,}",
                _fmt(layer.macs_before), _fmt(layer.macs_after), ratio,
            ))
        before, after = self.macs_before, self.macs_after
        rows.append((
            "total (decomposed layers)", "", "", f"{self.params_before:,}", f"{self.params_after:,}", _fmt(before),
            _fmt(after), "-" if not after else f"{before / after:.2f}x",
        ))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        out = [f"Tucker-2 decomposition: {len(self.layers)} conv(s) decomposed, {len(self.skipped)} skipped; "
               f"MACs {self.macs_unit} (FLOPs ~= 2 x MACs)", line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in rows[:-1]]
        out += [line(["-" * w for w in widths]), line(rows[-1])]
        ratio = self.model_params_before / self.model_params_after if self.model_params_after else float("nan")
        out.append(f"model parameters: {self.model_params_before:,} -> {self.model_params_after:,} ({ratio:.2f}x fewer)")
        if self.skipped:
            out.append("skipped: " + "; ".join(f"{n} ({r})" for n, r in self.skipped))
        out += self._rank_notes()
        timed = [layer for layer in [*self.layers, *self.kept_dense] if layer.tucker_ms is not None]
        if timed:
            out.append("measured latency per layer (ms, dense -> Tucker; kept dense where Tucker was not faster):")
            kept = {id(layer) for layer in self.kept_dense}
            for layer in timed:
                verdict = "kept dense" if id(layer) in kept else "Tucker"
                out.append(f"  {layer.name}: {layer.dense_ms:.3f} -> {layer.tucker_ms:.3f} "
                           f"({layer.dense_ms / layer.tucker_ms:.2f}x) {verdict}")
        if self.latency:
            lat = self.latency
            out.append(
                f"model latency (ms, fused for inference, batch {lat['batch']}): teacher {lat['teacher_ms']:.2f}, "
                f"student predicted {lat['student_predicted_ms']:.2f}, measured {lat['student_measured_ms']:.2f} "
                f"({lat['teacher_ms'] / lat['student_measured_ms']:.2f}x)"
            )
        return "\n".join(out)


    def _rank_notes(self) -> list:
        """Say where the ranks used are not EVBMF's own (weaken, min_rank, align), and where layers with
        distinct EVBMF ranks ended with the same ranks."""
        chosen = [layer for layer in self.layers if layer.evbmf_ranks is not None]
        changed = [layer for layer in chosen if tuple(layer.evbmf_ranks) != tuple(layer.ranks)]
        if not changed:
            return []
        notes = [f"ranks differ from EVBMF's in {len(changed)} of {len(chosen)} layer(s) (raised by weaken, min_rank "
                 "or align; the EVBMF column shows EVBMF's own ranks)"]
        by_ranks: dict = {}
        for layer in chosen:
            by_ranks.setdefault(tuple(layer.ranks), set()).add(tuple(layer.evbmf_ranks))
        merged = {r: e for r, e in by_ranks.items() if len(e) > 1}
        if merged:
            notes.append("distinct EVBMF ranks became the same ranks: " + "; ".join(
                f"{sorted(e)} -> {r}" for r, e in merged.items()) + " (align=1 keeps EVBMF's ranks)")
        return notes


def _fmt(value) -> str:
    return "-" if value is None else f"{value:,}"


def _patterns(name: str, value) -> list | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return list(value)
    raise TypeError(f"{name} must be None, a str or a list of str fnmatch patterns, got {value!r}")


def _skip_reason(conv: nn.Module, min_channels: int, skip_1x1: bool) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.groups != 1:
        return f"groups={conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if skip_1x1 and tuple(conv.kernel_size) == (1, 1):
        return "1x1 conv"
    if conv.in_channels < min_channels or conv.out_channels < min_channels:
        return f"fewer than min_channels={min_channels} channels ({conv.in_channels} -> {conv.out_channels})"
    try:
        _conv_padding(conv)
    except ValueError:
        return f"padding={conv.padding!r} needs asymmetric padding"
    return None


def _ranks_for(name: str, ranks):
    """ranks may be one spec for every layer or a dict {fnmatch pattern: spec} (first match wins)."""
    if isinstance(ranks, dict):
        for pattern, spec in ranks.items():
            if fnmatch.fnmatchcase(name, pattern):
                return spec
        return None
    return ranks


def _measure_sizes(model: nn.Module, convs: dict, input_shape, example_input, inputs: dict | None = None) -> dict:
    """{name: ((H_in, W_in), (H_out, W_out))} from one eval-mode, no-grad forward with hooks; fills
    ``inputs`` (when given) with {name: (full input shape, channels_last)}."""
    if example_input is None:
        param = next(model.parameters(), None)
        factory = {} if param is None else {"device": param.device, "dtype": param.dtype}
        example_input = torch.zeros(_checks.image_input_shape("input_shape", input_shape), **factory)
    sizes = {}
    specs = inputs

    def record(name):
        def hook(module, inputs, output):  # returns None: the output is left unchanged
            sizes.setdefault(name, (tuple(inputs[0].shape[2:]), tuple(output.shape[2:])))
            if specs is not None:
                x = inputs[0]
                specs.setdefault(name, (tuple(x.shape), not x.is_contiguous()
                                        and x.is_contiguous(memory_format=torch.channels_last)))

        return hook

    hooks = [conv.register_forward_hook(record(name)) for name, conv in convs.items()]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    except Exception as exc:  # the user's input did not fit the model: say which argument
        what = "example_input" if input_shape is None else f"input_shape={tuple(input_shape)}"
        raise ValueError(f"the forward pass used to measure MACs failed with {what}: {exc}") from exc
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in modes.items():
            m.train(mode)
    return sizes


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def decompose(
    model: nn.Module,
    ranks="evbmf",
    min_channels: int = 16,
    include=None,
    exclude=None,
    inplace: bool = False,
    *,
    skip_first: bool = True,
    skip_1x1: bool = True,
    n_iter_max: int = 0,
    input_shape=None,
    example_input=None,
    keep_dense_if_slower: bool = False,
    timing_rounds: int = 15,
    **rank_options,
):
    """Replace eligible nn.Conv2d layers of ``model`` by TuckerConv2d.from_conv (see module docstring).

    Args:
        model: any nn.Module. Deep-copied first unless ``inplace=True``.
        ranks: "evbmf" (default), a float in (0, 1], a pair (r_out, r_in), or a dict mapping fnmatch
            name patterns to any of those (first match wins; convs matching none are skipped).
        min_channels: convs with fewer input or output channels are skipped.
        include, exclude: fnmatch pattern or list of patterns on module names.
        skip_first, skip_1x1: the default skips of the stem conv and of 1x1 convs.
        n_iter_max: HOOI iterations after the HOSVD initialisation (0 = plain HOSVD).
        input_shape: (C, H, W) of one sample or (N, C, H, W) of a batch (the convention of kdfast.cost
            too), or example_input: a tensor (or tuple of forward args); either makes the report give
            MACs per sample (one eval-mode forward with hooks, running BatchNorm statistics untouched).
            Without them, a model loaded from a model file (kdfast.model_file.load_model) is measured at
            the input size the file records (``model.kdfast_input_shape``); otherwise MACs are per output
            pixel, with the first 1x1 conv's input pixels taken as stride_h * stride_w per output pixel.
        keep_dense_if_slower: latency-aware decomposition. Each decomposed layer is timed against its
            dense conv at its real input (the batch, size and memory format of ``example_input``, or
            the batch of ``input_shape``: 1 for (C, H, W); one of them is required) on the model's device, both as
            fuse_for_inference runs them (BN folded: with bias), ``timing_rounds`` rounds in alternation;
            the dense conv is kept wherever the Tucker layer's median is not lower. On CPU the Tucker layer
            runs the path the op's run-time autotuning picks for that input (kdfast.backends.tucker: its
            first call measures the fused kernel against the composition and caches the faster, and the
            fused model later reuses the same cache), so each conv is compared with the faster Tucker path. The report then lists
            every layer's latencies, the convs kept dense (``report.kept_dense``) and the model's
            measured and predicted latencies (``report.latency``; both models fused for inference).
        **rank_options: weaken, min_rank, align for ranks="evbmf" (see kdfast.evbmf.tucker2_ranks).
    Returns:
        (model, DecompositionReport)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, numbers.Integral) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    if input_shape is not None and example_input is not None:
        raise ValueError("pass input_shape or example_input, not both")
    if input_shape is None and example_input is None:
        input_shape = getattr(model, "kdfast_input_shape", None)  # recorded by the model file it came from
    if input_shape is not None:
        _checks.image_input_shape("input_shape", input_shape)
    if not isinstance(keep_dense_if_slower, bool):
        raise TypeError(f"keep_dense_if_slower must be a bool, got {keep_dense_if_slower!r}")
    if keep_dense_if_slower and input_shape is None and example_input is None:
        raise ValueError("keep_dense_if_slower=True times each layer at its real input: pass input_shape or example_input")
    if isinstance(timing_rounds, bool) or not isinstance(timing_rounds, numbers.Integral) or timing_rounds < 1:
        raise ValueError(f"timing_rounds must be an int >= 1, got {timing_rounds!r}")
    if not (isinstance(ranks, (str, float, tuple, list, dict)) and not isinstance(ranks, bool)):
        raise TypeError(f"ranks must be 'evbmf', a float in (0, 1], a pair (r_out, r_in) or a dict of those, got {ranks!r}")

    if not inplace:
        model = copy.deepcopy(model)
    params_before = _count_params(model)
    teacher = copy.deepcopy(model) if keep_dense_if_slower else None

    report = DecompositionReport()
    selected = {}
    first_seen = False
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        is_first, first_seen = not first_seen, True
        reason = _skip_reason(module, min_channels, skip_1x1)
        if reason is None and skip_first and is_first:
            reason = "first conv (skip_first=True)"
        if reason is None and include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            reason = "not matched by include"
        if reason is None and exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            reason = "matched by exclude"
        if reason is None and _ranks_for(name, ranks) is None:
            reason = "no pattern of the ranks dict matches"
        if reason is None:
            selected[name] = module
        else:
            report.skipped.append((name, reason))

    sizes, inputs = {}, {}
    if input_shape is not None or example_input is not None:
        sizes = _measure_sizes(model, selected, input_shape, example_input, inputs if keep_dense_if_slower else None)
        report.macs_unit = "per sample"

    if not selected:
        # Not an error (a model may legitimately have nothing to decompose), but never silent.
        reasons = sorted({r for _, r in report.skipped})
        warnings.warn("decompose replaced no convolution" + (f" (skipped: {', '.join(map(str, reasons))})"
                                                             if reasons else " (the model has no nn.Conv2d)"),
                      stacklevel=2)
    replacements = {}
    for name, conv in selected.items():
        spec, evbmf = _ranks_for(name, ranks), None
        try:
            if spec == "evbmf" and not set(rank_options) - set(_RANK_OPTIONS):
                from .evbmf import choose_ranks  # scipy is imported only when EVBMF is used

                evbmf, spec = choose_ranks(conv.weight, **rank_options)  # EVBMF's own ranks, for the report
                layer = TuckerConv2d.from_conv(conv, spec, n_iter_max=n_iter_max)
            else:
                layer = TuckerConv2d.from_conv(conv, spec, n_iter_max=n_iter_max, **rank_options)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
        entry = _layer_report(name, conv, layer, sizes.get(name), bool(sizes))
        entry.evbmf_ranks = evbmf
        if keep_dense_if_slower and name in inputs:
            entry.dense_ms, entry.tucker_ms = _time_layer(conv, layer, inputs[name], timing_rounds)
            if entry.tucker_ms >= entry.dense_ms:
                report.kept_dense.append(entry)
                continue
        replacements[id(conv)] = layer
        report.layers.append(entry)

    # Swap every reference (a conv shared by two parents is replaced in both, sharing kept).
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])

    report.model_params_before = params_before
    report.model_params_after = _count_params(model)
    if keep_dense_if_slower:
        report.latency = _model_latency(teacher, model, report, input_shape, example_input, timing_rounds)
    return model, report


def paired_times(steps: dict, rounds: int) -> dict:
    """Seconds of each zero-argument step per round, {name: [seconds]}: the steps run in turns (order
    rotated every round) after a warm-up call each, so that slow drift of a shared machine hits every
    step alike; the GPU is synchronised around each call when there is one."""
    import time

    device_sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    order = list(steps)
    for _ in range(rounds):
        order.append(order.pop(0))
        for name in order:
            device_sync()
            t0 = time.perf_counter()
            steps[name]()
            device_sync()
            times[name].append(time.perf_counter() - t0)
    return times


def _timed_medians(steps: dict, rounds: int) -> dict:
    """Median seconds of each step under :func:`paired_times`."""
    import statistics

    return {name: statistics.median(ts) for name, ts in paired_times(steps, rounds).items()}


def _time_layer(conv: nn.Conv2d, layer: TuckerConv2d, input_spec, rounds: int) -> tuple:
    """(dense ms, Tucker ms) at the layer's real input, both with a bias as after BN folding."""
    from . import ops

    shape, channels_last = input_spec
    w = conv.weight.detach()
    x = torch.randn(shape, dtype=w.dtype, device=w.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(conv.out_channels, dtype=w.dtype, device=w.device)
    factors = [p.detach() for p in (layer.first, layer.core, layer.last)]
    conv_args = dict(stride=conv.stride, padding=_conv_padding(conv), dilation=conv.dilation)
    with torch.no_grad():
        medians = _timed_medians({
            "dense": lambda: torch.nn.functional.conv2d(x, w, bias, **conv_args),
            "tucker": lambda: ops.tucker_conv2d(x, *factors, bias, **conv_args),
        }, rounds)
    return 1e3 * medians["dense"], 1e3 * medians["tucker"]


def _model_latency(teacher, student, report, input_shape, example_input, rounds: int) -> dict:
    """Measured (paired) latencies of the teacher and the student, both fused for inference, and the
    student's prediction from the per-layer timings: teacher - sum(dense - Tucker) over kept Tucker layers."""
    from .fusion import fuse_for_inference

    param = next(teacher.parameters(), None)
    factory = {} if param is None else {"device": param.device, "dtype": param.dtype}
    x = example_input if example_input is not None else torch.randn(_checks.image_input_shape("input_shape", input_shape),
                                                                    **factory)
    args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    with warnings.catch_warnings():  # untraceable models are fused child by child; the warning is not news here
        warnings.simplefilter("ignore")
        fused_teacher, fused_student = fuse_for_inference(teacher), fuse_for_inference(student, inplace=False)
    with torch.no_grad():
        medians = _timed_medians({"teacher": lambda: fused_teacher(*args), "student": lambda: fused_student(*args)},
                                 rounds)
    teacher_ms, student_ms = 1e3 * medians["teacher"], 1e3 * medians["student"]
    saved = sum(layer.dense_ms - layer.tucker_ms for layer in report.layers if layer.tucker_ms is not None)
    return {"batch": int(args[0].shape[0]), "teacher_ms": teacher_ms, "student_predicted_ms": teacher_ms - saved,
            "student_measured_ms": student_ms}


def _layer_report(name, conv: nn.Conv2d, layer: TuckerConv2d, size, measured: bool) -> LayerReport:
    o, c = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    r_out, r_in = layer.ranks
    bias = o if conv.bias is not None else 0
    if measured and size is None:  # the conv did not run in the measuring forward
        macs_before = macs_after = None
        in_size = out_size = None
    else:
        if size is None:  # per output pixel; the first 1x1 runs at input resolution
            in_pixels, out_pixels = conv.stride[0] * conv.stride[1], 1
            in_size = out_size = None
        else:
            (hi, wi), (ho, wo) = size
            in_pixels, out_pixels = hi * wi, ho * wo
            in_size, out_size = (hi, wi), (ho, wo)
        macs_before = o * c * kh * kw * out_pixels
        macs_after = r_in * c * in_pixels + r_out * r_in * kh * kw * out_pixels + o * r_out * out_pixels
    return LayerReport(
        name=name, in_channels=c, out_channels=o, kernel_size=(kh, kw), stride=tuple(conv.stride),
        ranks=(r_out, r_in),
        params_before=sum(p.numel() for p in conv.parameters()),
        params_after=sum(p.numel() for p in layer.parameters()),
        macs_before=macs_before, macs_after=macs_after, input_size=in_size, output_size=out_size,
    )


__all__ = ["DecompositionReport", "LayerReport", "decompose"]
