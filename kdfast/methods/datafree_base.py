"""What the data-free methods (DAFL, DFAD, RDSKD) share: the generator, the teacher-feature tap,
collapse detection and the diversity measures of generated samples.

* :class:`Generator`: the DAFL-style generator of the three official repositories
  (huawei-noah/Efficient-Computing ``Data-Efficient-Model-Compression/DAFL/DAFL-train.py``
  ``Generator``, PengchaoHan/RDSKD ``generator.py``, VainF/Data-Free-Adversarial-Distillation
  ``network/gan.py`` ``GeneratorA``): linear -> BN -> (upsample x2, conv3x3, BN, LeakyReLU 0.2)
  twice -> conv3x3 to the image channels -> tanh -> BN without affine parameters.
* :class:`PenultimateTap`: the teacher's penultimate feature (the input of its classifier), which
  DAFL's activation loss needs, read with a forward pre-hook instead of a model that returns it.
* :class:`CollapseMonitor`: a generator that produces NaN, or whose samples the teacher puts all in
  one class for a whole epoch, stops the run with :class:`GeneratorCollapse` naming the epoch.
* :func:`class_histogram`, :func:`mean_pairwise_distance`: RDSKD's two diversity notions, measured.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..distill import Auxiliary, Distiller, NoiseSource, autocast
from . import options as T

__all__ = ["Generator", "GeneratorCollapse", "CollapseMonitor", "PenultimateTap", "class_histogram",
           "collapse_reason", "mean_pairwise_distance", "OFFICIAL_BN_EPS"]

#: ``nn.BatchNorm2d(128, 0.8)`` in the DAFL and RDSKD generators: the second positional argument is
#: eps, so their two conv-block BatchNorms use eps = 0.8 (a quirk inherited from DCGAN example code;
#: DFAD's GeneratorA uses the default 1e-5).
OFFICIAL_BN_EPS = 0.8


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Generator(nn.Module):
    """DAFL-style image generator: ``z (B, latent_dim)`` -> images ``(B, channels, image_size, image_size)``.

    Args:
        latent_dim: size of z (official MNIST: 100).
        image_size: output height = width; a multiple of 4 (two x2 upsamplings from image_size / 4).
            16 for kdfast's digits, 32 for MNIST/CIFAR as in the official code.
        channels: image channels (1 for digits/MNIST, 3 for CIFAR).
        ngf: base width: the blocks have 2 * ngf and ngf channels (official: 128 and 64, ngf = 64).
        bn_eps_quirk: use eps = 0.8 in the two conv-block BatchNorms as the DAFL and RDSKD code does
            (``nn.BatchNorm2d(128, 0.8)``); False gives PyTorch's default 1e-5 (DFAD's GeneratorA).
        channels_last: keep the convolution weights and activations in the channels-last memory
            layout (same values; on 2 CPU cores one forward + backward at batch 512 and 32x32 ran
            about 2x faster: the upsampled 3x3 convolutions dominate the cost and oneDNN prefers NHWC).

    The last layer is a BatchNorm without affine parameters after the tanh, as in all three
    repositories: in train mode each batch of images is standardised per channel.
    ``forward`` also accepts z shaped ``(B, latent_dim, 1, 1)`` (DFAD's noise layout).
    """

    def __init__(self, latent_dim: int = 100, image_size: int = 32, channels: int = 1, ngf: int = 64,
                 bn_eps_quirk: bool = False, channels_last: bool = False):
        super().__init__()
        self.latent_dim = _positive_int("latent_dim", latent_dim)
        self.image_size = _positive_int("image_size", image_size)
        self.channels = _positive_int("channels", channels)
        self.ngf = _positive_int("ngf", ngf)
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two x2 upsamplings), got {image_size}")
        self.bn_eps_quirk = bool(bn_eps_quirk)
        eps = OFFICIAL_BN_EPS if self.bn_eps_quirk else 1e-5
        self.init_size = image_size // 4
        wide = 2 * ngf
        self.project = nn.Linear(latent_dim, wide * self.init_size ** 2)
        self.bn0 = nn.BatchNorm2d(wide)
        self.block1 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(wide, wide, 3, padding=1),
                                    nn.BatchNorm2d(wide, eps=eps), nn.LeakyReLU(0.2, inplace=True))
        self.block2 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(wide, ngf, 3, padding=1),
                                    nn.BatchNorm2d(ngf, eps=eps), nn.LeakyReLU(0.2, inplace=True))
        self.to_image = nn.Sequential(nn.Conv2d(ngf, channels, 3, padding=1), nn.Tanh(),
                                      nn.BatchNorm2d(channels, affine=False))
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def image_shape(self) -> tuple:
        return (self.channels, self.image_size, self.image_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() == 4 and z.shape[2:] == (1, 1):
            z = z.flatten(1)
        if z.dim() != 2 or z.shape[1] != self.latent_dim or z.shape[0] == 0:
            raise ValueError(f"z must have shape (B, {self.latent_dim}) or (B, {self.latent_dim}, 1, 1) with "
                             f"B >= 1, got {tuple(z.shape)}")
        x = self.project(z).view(z.shape[0], 2 * self.ngf, self.init_size, self.init_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.to_image(self.block2(self.block1(self.bn0(x))))

    def extra_repr(self) -> str:
        return (f"latent_dim={self.latent_dim}, image_shape={self.image_shape}, ngf={self.ngf}, "
                f"bn_eps_quirk={self.bn_eps_quirk}" + (", channels_last=True" if self.channels_last else ""))


class PenultimateTap:
    """The input of one layer of ``model``, recorded on every forward by a forward pre-hook. Default:
    the model's ``representation_layer`` if it names one (kdfast's LeNet-5: ``fc2``), else its last
    ``nn.Linear`` (the feature the classifier sees).

    DAFL's activation loss uses this feature: LeNet-5's 120-d conv3 output (``feature =
    output.view(-1, 120)``, the input of its fc1, two layers before the logits) or ResNet's pooled
    512-d feature before the FC in the official code (huawei-noah/Efficient-Computing, DAFL ``lenet.py``,
    ``resnet.py``).
    """

    def __init__(self, model: nn.Module, layer: Optional[str] = None):
        from ..distill import resolve_module

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if layer is None:
            layer = getattr(model, "representation_layer", None)
        if layer is None:
            linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"{type(model).__name__} has no nn.Linear layer; pass feature_layer=<name of the "
                                 "layer whose input is the penultimate feature>")
            layer = linears[-1]
        self.layer = layer
        self.feature: Optional[torch.Tensor] = None
        self._handle = resolve_module(model, layer).register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        self.feature = inputs[0]

    def pop(self) -> torch.Tensor:
        """The feature of the last forward (and forget it, so a stale one is never reused)."""
        if self.feature is None:
            raise RuntimeError(f"PenultimateTap has no input of layer {self.layer!r}: run the model first")
        feature, self.feature = self.feature, None
        return feature

    def remove(self) -> None:
        self._handle.remove()
        self.feature = None


# ------------------------------------------------------------------------------------------ collapse
class GeneratorCollapse(RuntimeError):
    """The generator collapsed: NaN/inf samples, or one class only for a whole epoch. ``epoch`` and
    ``class_counts`` (the teacher's classes of that epoch's samples) say where and how."""

    def __init__(self, message: str, epoch: int = -1, class_counts=None):
        super().__init__(message)
        self.epoch, self.class_counts = epoch, class_counts


def collapse_reason(class_counts: torch.Tensor, nonfinite: bool) -> Optional[str]:
    """Why an epoch's generated samples count as collapsed, or None.

    ``class_counts``: (K,) how many samples the teacher put in each class during the epoch;
    ``nonfinite``: whether any generated image or teacher logit was NaN/inf.
    """
    if nonfinite:
        return "the generated images or the teacher's logits contain NaN/inf"
    counts = torch.as_tensor(class_counts)
    if counts.dim() != 1:
        raise ValueError(f"class_counts must be 1-D (one count per class), got shape {tuple(counts.shape)}")
    total = int(counts.sum())
    used = int((counts > 0).sum())
    if total > 0 and used == 1 and counts.numel() > 1:
        return f"all {total} generated samples were predicted as class {int(counts.argmax())} by the teacher"
    return None


class CollapseMonitor:
    """Accumulates, over one epoch and without host syncs, the teacher's class counts on generated
    samples and whether anything was non-finite; :meth:`check` raises :class:`GeneratorCollapse`.

    Under DDP the counts and the flag are summed over ranks in :meth:`check` (a collective: every
    rank must call it), so that all ranks stop together.
    """

    def __init__(self, num_classes: int, one_class_is_collapse: bool = True):
        self.num_classes = _positive_int("num_classes", num_classes)
        self.one_class_is_collapse = bool(one_class_is_collapse)
        self.counts: Optional[torch.Tensor] = None
        self.bad: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.counts, self.bad = None, None

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, images: Optional[torch.Tensor] = None) -> None:
        logits = teacher_logits.detach()
        if self.counts is None:
            self.counts = torch.zeros(self.num_classes, dtype=torch.int64, device=logits.device)
            self.bad = torch.zeros((), dtype=torch.bool, device=logits.device)
        self.counts += torch.bincount(logits.argmax(dim=1), minlength=self.num_classes)[: self.num_classes]
        bad = ~torch.isfinite(logits).all()
        if images is not None:
            bad = bad | ~torch.isfinite(images.detach()).all()
        self.bad |= bad

    def check(self, epoch: int, what: str = "generator", one_class: bool = True) -> Dict[str, object]:
        """Raise :class:`GeneratorCollapse` if this epoch collapsed (NaN/inf; or, with ``one_class``,
        a single class all epoch); else return its class counts and reset for the next epoch.
        ``epoch`` is printed as given (kdfast logs 0-based epochs)."""
        if self.counts is None:
            return {"class_counts": None}
        stats = torch.cat([self.counts, self.bad.to(torch.int64).view(1)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        stats = stats.cpu()
        counts, nonfinite = stats[:-1], bool(stats[-1] > 0)
        self.reset()
        one_class = one_class and self.one_class_is_collapse
        reason = collapse_reason(counts if one_class else torch.zeros(0, dtype=torch.int64), nonfinite)
        if reason is not None:
            raise GeneratorCollapse(
                f"the {what} collapsed in epoch {epoch} (0-based): {reason}. Training stopped; the last good "
                "checkpoint is the previous epoch's. Lower the generator's learning rate or change the loss "
                "weights, then resume or restart.", epoch=epoch, class_counts=counts.tolist())
        return {"class_counts": counts.tolist()}


# ------------------------------------------------------------------------------------------ diversity
def class_histogram(logits: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """(K,) fraction of samples per predicted class (argmax of ``logits``)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty (B, K) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    k = logits.shape[1] if num_classes is None else num_classes
    counts = torch.bincount(logits.argmax(dim=1), minlength=k).double()
    return counts / counts.sum()


def mean_pairwise_distance(images: torch.Tensor) -> float:
    """Mean Euclidean distance between all pairs of (flattened) images: the inter-sample diversity
    that RDSKD's sample-diversity loss seeks (larger = more diverse)."""
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or images.shape[0] < 2:
        raise ValueError("images must be a tensor (B, ...) with B >= 2 to have pairs, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    return float(torch.pdist(images.flatten(1).double()).mean())


def entropy_bits(histogram: Sequence[float]) -> float:
    """Entropy in bits of a class histogram (log2 K for perfectly balanced classes, 0 for one class)."""
    p = torch.as_tensor(list(histogram), dtype=torch.float64)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


# ------------------------------------------------------------------------------------------ engine
def infer_num_classes(teacher: nn.Module, image_shape: Sequence[int]) -> int:
    """Number of classes of ``teacher``: the width of its output on one dummy batch."""
    param = next(iter(teacher.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            out = teacher(torch.zeros(2, *image_shape, device=device))
    finally:
        teacher.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the teacher must return (B, K) logits for images of shape {tuple(image_shape)}, got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return int(out.shape[1])


class _Frozen:
    """``with _Frozen(module):`` parameters temporarily without requires_grad (no weight gradients are
    computed through it; gradients still flow to its input)."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


# The option types every data-free method shares (the generator and the noise batches).
GENERATOR_OPTION_TYPES = {
    "latent_dim": T.POSITIVE_INT, "image_size": T.POSITIVE_INT, "channels": T.POSITIVE_INT, "ngf": T.POSITIVE_INT,
    "bn_eps_quirk": T.BOOL, "channels_last": T.BOOL, "batch_size": T.POSITIVE_INT, "collapse_warmup": T.NON_NEGATIVE_INT,
    "steps_per_epoch": T.POSITIVE_INT,
}


def split_options(options, method_options, engine_defaults):
    """(method options with defaults filled in, engine keywords): the keys of ``method_options`` are the
    method's; every other key is a :class:`~kdfast.distill.Distiller` keyword (validated by it), with the
    method's ``engine_defaults`` (its official optimizer, learning rate, epochs) where not given."""
    method = {**method_options, **{k: v for k, v in options.items() if k in method_options}}
    engine = {**engine_defaults, **{k: v for k, v in options.items() if k not in method_options}}
    return method, engine


def _kd(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float, t2_scale: bool) -> torch.Tensor:
    from .. import ops

    return ops.kd_loss(s_logits, t_logits, None, temperature, 1.0, t2_scale)


class GeneratorDistiller(Distiller):
    """Base of the data-free engines: the generator is the auxiliary trainable ``"generator"``
    (Adam, as all three official codes), batches are latent noise from a :class:`NoiseSource`, the
    frozen teacher runs with gradients flowing to its input images, and a :class:`CollapseMonitor`
    stops the run when the generator collapses.

    ``fit(train=None, ...)``: with ``train=None`` the engine draws its own noise
    (:meth:`noise_source`: ``batch_size`` x latent per step, ``steps_per_epoch`` steps).

    Collapse: NaN/inf in the generated images or the teacher's logits stops the run at the end of the
    epoch; so does an epoch whose samples the teacher put all in one class, except during the first
    ``collapse_warmup`` epochs (an untrained generator makes noise, which a teacher often puts in a
    single class).
    """

    #: noise vectors drawn per optimisation iteration, in units of the batch size (DFAD: 6)
    draws_per_step = 1

    def __init__(self, teacher: nn.Module, student: nn.Module, *, generator: nn.Module, num_classes: int,
                 batch_size: int, steps_per_epoch: int, gen_lr: Optional[float] = None,
                 gen_betas=(0.9, 0.999), gen_optimizer: str = "adam", train_generator: bool = True,
                 collapse_warmup: int = 1, **engine_kwargs):
        if teacher is None:
            raise ValueError("data-free distillation needs a teacher (the generator is trained against it)")
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be a torch.nn.Module, got {type(generator).__name__}")
        latent = getattr(generator, "latent_dim", None)
        if not isinstance(latent, int):
            raise ValueError("generator must have an int attribute latent_dim (the size of its noise vector)")
        self.latent_dim = latent
        self.noise_batch = _positive_int("batch_size", batch_size)
        self.steps_per_epoch = _positive_int("steps_per_epoch", steps_per_epoch)
        auxiliaries = {}
        if train_generator:
            if not (isinstance(gen_lr, (int, float)) and gen_lr > 0):
                raise ValueError(f"gen_lr must be a positive number, got {gen_lr!r}")
            # Adam with PyTorch's default betas in all three official codes ("sgd": plain SGD, no momentum)
            auxiliaries["generator"] = Auxiliary(generator, optimizer=gen_optimizer, lr=float(gen_lr),
                                                 betas=tuple(gen_betas), momentum=0.0, weight_decay=0.0)
        super().__init__(teacher, student, losses={}, auxiliaries=auxiliaries, **engine_kwargs)
        if train_generator:
            self.generator = self.auxiliaries["generator"].module
        else:
            self.generator = generator.to(self.device).eval().requires_grad_(False)
        self.monitor = CollapseMonitor(num_classes)
        if isinstance(collapse_warmup, bool) or not isinstance(collapse_warmup, int) or collapse_warmup < 0:
            raise ValueError(f"collapse_warmup must be an int >= 0, got {collapse_warmup!r}")
        self.collapse_warmup = collapse_warmup

    def noise_source(self) -> "NoiseSource":
        return NoiseSource(self.noise_batch * self.draws_per_step, (self.latent_dim,), self.steps_per_epoch)

    def fit(self, train=None, epochs=None, eval_loader=None):
        source = self.noise_source() if train is None else train
        try:
            return super().fit(source, epochs=epochs, eval_loader=eval_loader)
        except FloatingPointError:
            # The engine's own end-of-epoch NaN check fired first: name the generator if it is the cause.
            self.monitor.check(self.epoch, "generator" if "generator" in self.auxiliaries else "frozen generator")
            raise

    # -- building blocks
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        gen = self.auxiliary_model("generator") if "generator" in self.auxiliaries else self.generator
        with autocast(self.device, self.amp):
            return gen(z.to(self.device, non_blocking=True)).float()

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher logits (float32); gradients flow to ``x`` when it requires grad (teacher frozen)."""
        with autocast(self.device, self.amp):
            return self.teacher(x).float()

    def student_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Student logits through the engine's trainable module (DDP-synchronised under torchrun; it
        applies autocast itself). No loss modules: the method computes its losses."""
        return self.model(x, None, None, {}, {})[0].float()

    def kd_student_step(self, x: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> dict:
        """The student's step on generated images ``x`` the teacher scored (``t_logits``, no grad):
        the collapse monitor sees them, the student learns KD(T) (T^2-scaled) from the teacher."""
        self.monitor.update(t_logits, x)
        s_logits = self.student_logits(x)
        loss = _kd(s_logits, t_logits, temperature, True)
        self.backward_step(loss, "student")
        return {"loss": loss.detach(), "parts": {"kd": loss.detach()}, "logits": s_logits.detach(), "targets": None}

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        # the engine puts the student in train mode; a trained generator too (BN batch statistics, as
        # the official loops), a frozen one stays as it was given (RDSKD's student stage: eval mode)
        if "generator" in self.auxiliaries:
            self.generator.train()
        self.monitor.reset()

    def on_epoch_end(self, epoch: int, record) -> None:
        what = "generator" if "generator" in self.auxiliaries else "frozen generator"
        try:
            record["class_counts"] = self.monitor.check(epoch, what, one_class=epoch >= self.collapse_warmup)["class_counts"]
        except GeneratorCollapse as err:  # the epoch's record (already in history) says so; no checkpoint is written
            record["class_counts"], record["collapsed"] = err.class_counts, str(err)
            raise
        super().on_epoch_end(epoch, record)


class NoiseKD(GeneratorDistiller):
    """The lower bound: KD on Gaussian-noise images (no generator training): the 'generator' is
    the identity on image-shaped noise N(0, I), the student learns KD(T) from the teacher on it."""

    def __init__(self, teacher, student, *, image_shape: Sequence[int], num_classes: int, batch_size: int,
                 steps_per_epoch: int, temperature: float = 4.0, **engine_kwargs):
        self.temperature = float(temperature)
        super().__init__(teacher, student, generator=_GaussianImages(image_shape), num_classes=num_classes,
                         batch_size=batch_size, steps_per_epoch=steps_per_epoch, train_generator=False,
                         **engine_kwargs)
        # noise is no generator: a teacher may well put all of it in one class; only NaN stops the run
        self.monitor.one_class_is_collapse = False

    def noise_source(self):
        return NoiseSource(self.noise_batch, tuple(self.generator.image_shape), self.steps_per_epoch)

    def training_step(self, batch):
        x = batch.to(self.device, non_blocking=True)
        with torch.no_grad():
            t_logits = self.teacher_logits(x)
        return self.kd_student_step(x, t_logits, self.temperature)


class _GaussianImages(nn.Module):
    """Stand-in generator of NoiseKD: its 'latent' vector is the flattened image."""

    def __init__(self, image_shape):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_dim = int(torch.tensor(self.image_shape).prod())

    def forward(self, z):
        return z.view(z.shape[0], *self.image_shape)
