"""Tiny models, protocol-conforming loss modules and data for the trainer tests (also imported by the
DDP / resume worker scripts, which run as separate processes)."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class TinyNet(nn.Module):
    """conv -> relu -> conv -> relu -> pool -> linear; no BatchNorm (DDP equality needs no BN statistics)."""

    def __init__(self, width=4, classes=5, dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


class SoftKL(nn.Module):
    """Hinton KD (batchmean KL, T^2 scaled) following the "logits" protocol."""

    kdfast_inputs = "logits"

    def __init__(self, T=4.0):
        super().__init__()
        self.T = T

    def forward(self, student_logits, teacher_logits, targets=None):
        T = self.T
        return F.kl_div(F.log_softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1),
                        reduction="batchmean") * T * T


class HintMSE(nn.Module):
    """FitNet-style hint with a 1x1 regressor per pair (has parameters), "features" protocol."""

    kdfast_inputs = "features"

    def __init__(self, pairs):
        super().__init__()
        self.regressors = nn.ModuleList(nn.Conv2d(cs, ct, 1) for cs, ct in pairs)

    def forward(self, student_feats, teacher_feats):
        return sum(F.mse_loss(r(s), t) for r, s, t in zip(self.regressors, student_feats, teacher_feats))


class Recorder(nn.Module):
    """Records the arguments it is called with (to check the dispatch), returns a differentiable scalar."""

    def __init__(self, kind):
        super().__init__()
        if kind is not None:
            self.kdfast_inputs = kind
        self.calls = []

    def forward(self, *args):
        self.calls.append([[a.detach().clone() for a in x] if isinstance(x, list) else
                           (x.detach().clone() if isinstance(x, torch.Tensor) else x) for x in args])
        first = args[0][0] if isinstance(args[0], list) else args[0]
        return first.float().square().mean()


def synthetic(n=32, classes=5, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def models(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return TinyNet(8), TinyNet(4, dropout=dropout)
