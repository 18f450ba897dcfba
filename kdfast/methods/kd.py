"""Hinton KD and its feature-loss companions (KD+NST, KD+AT) as fine-tuning recipes: how the first source
paper fine-tunes a Tucker-decomposed CNN. Sadhukhan, Saha, Mukhopadhyay, Patra, "Knowledge Distillation
Inspired Fine-Tuning of Tucker Decomposed CNNs and Adversarial Robustness Analysis", ICIP 2020.

The paper decomposes a trained CNN (the teacher) with Tucker-2, then fine-tunes the decomposed network (the
student) by distilling from the undecomposed teacher instead of by cross-entropy alone. The recipes
(:data:`RECIPES`, :func:`build`) differ only by the loss: CE (the usual fine-tuning, Kim et al., ICLR 2016),
KD (Hinton et al. 2015, T = 4, 0.9 KD + 0.1 CE), KD + NST (Huang & Wang 2017, poly kernel, weight 50 as
RepDistiller's ``train_student.py``), KD + AT (Zagoruyko & Komodakis, ICLR 2017, beta = 1000).

The paper's protocol (teacher -> decomposition -> fine-tuning by each recipe -> FGSM/PGD robustness) is
the experiment :mod:`kdfast.experiments.kd`.
"""
from __future__ import annotations

from torch import nn

NAME = "kd"
TITLE = "Tucker-2 students fine-tuned by KD, and their adversarial robustness"
PAPER = ("Sadhukhan, Saha, Mukhopadhyay, Patra, \"Knowledge Distillation Inspired Fine-Tuning of Tucker "
         "Decomposed CNNs and Adversarial Robustness Analysis\", ICIP 2020; Hinton, Vinyals, Dean, \"Distilling "
         "the Knowledge in a Neural Network\", 2015")
# build() options: the recipe and its weights; Distiller keywords (lr, epochs, ...) pass through.
OPTIONS = {"recipe": "kd", "temperature": 4.0, "alpha": 0.9, "nst_weight": 50.0, "at_beta": 1000.0,
           "fsp_weight": 1.0, "feature_layers": None}

RECIPES = {
    # name: (label, description)
    "ce": ("CE", "cross-entropy with the labels only (the usual fine-tuning of a decomposed network)"),
    "kd": ("KD", "Hinton KD from the teacher: 0.9 T^2 KL(T=4) + 0.1 CE (kdfast.losses.KDLoss)"),
    "kd_nst": ("KD+NST", "KD + 50 x NST (poly kernel) on the stage outputs (kdfast.losses.NSTLoss)"),
    "kd_at": ("KD+AT", "KD + attention transfer, beta = 1000, on the stage outputs (kdfast.losses.ATLoss)"),
    "kd_fsp": ("KD+FSP", "KD + 1 x FSP (Yim et al., CVPR 2017: the flow matrices of consecutive stage outputs, "
                         "lambda = 1 as in the paper) (kdfast.losses.FSPLoss)"),
}


def feature_layers_for(model: nn.Module) -> list[str]:
    """Stage outputs used by the feature losses: RepDistiller's feat[1:-1] convention (for a
    ResNet layer1..layer3; for a VGG block1..block4)."""
    layers = list(getattr(model, "feature_layers", ()))
    if not layers:
        raise ValueError(f"{type(model).__name__} lists no feature_layers; the feature losses need stage outputs")
    return layers[1:] if len(layers) > 3 else layers


def recipe_losses(recipe: str, temperature: float = 4.0, alpha: float = 0.9, nst_weight: float = 50.0,
                  at_beta: float = 1000.0, fsp_weight: float = 1.0) -> dict:
    """The named losses of a fine-tuning recipe (``{name: module or (module, weight)}``)."""
    from ..losses import ATLoss, FSPLoss, KDLoss, NSTLoss

    if recipe == "ce":
        return {"ce": nn.CrossEntropyLoss()}
    kd = KDLoss(temperature=temperature, alpha=alpha)
    if recipe == "kd":
        return {"kd": kd}
    if recipe == "kd_nst":
        return {"kd": kd, "nst": (NSTLoss("poly"), nst_weight)}
    if recipe == "kd_at":
        return {"kd": kd, "at": ATLoss(beta=at_beta)}
    if recipe == "kd_fsp":
        # Yim et al. train FSP first and the task after; as a companion of KD it is one more weighted term.
        return {"kd": kd, "fsp": (FSPLoss(), fsp_weight)}
    raise ValueError(f"unknown recipe {recipe!r}; choose from {list(RECIPES)}")


def build(teacher, student, *, recipe: str = "kd", temperature: float = 4.0, alpha: float = 0.9,
          nst_weight: float = 50.0, at_beta: float = 1000.0, fsp_weight: float = 1.0, feature_layers=None,
          **engine):
    """A :class:`~kdfast.distill.Distiller` for one recipe. Feature recipes (kd_nst, kd_at, kd_fsp) read
    ``feature_layers`` = (student layers, teacher layers), by default the models' stage outputs
    (:func:`feature_layers_for`). ``engine``: Distiller keywords (lr, epochs, schedule, amp, ...)."""
    from ..distill import Distiller

    losses = recipe_losses(recipe, temperature, alpha, nst_weight, at_beta, fsp_weight)
    feature_names = [n for n, spec in losses.items()
                     if getattr(spec[0] if isinstance(spec, tuple) else spec, "kdfast_inputs", None) == "features"]
    layers = None
    if feature_names:
        pair = feature_layers or (feature_layers_for(student), feature_layers_for(teacher))
        layers = {n: tuple(pair) for n in feature_names}
    return Distiller(teacher if recipe != "ce" else None, student, losses, feature_layers=layers, **engine)
