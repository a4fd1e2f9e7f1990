"""Train a small pre-activation ResNet with Batch Kalman Normalization on micro-batches.

One file, the library alone (no kalmannorm.lab). A pre-activation ResNet-20 is built with plain
BatchNorm and converted with ``kalmannorm.convert_norm(model, "bkn-flow", stat_batch_size=2)``,
its convolutions centred (``kalmannorm.center_conv_weights``, the best configuration measured):
every norm layer then normalises each batch of 128 in 64 groups of 2 samples, fusing each
group's statistics with the prior it predicts from the layers that feed it. It trains on
Fashion-MNIST (the idx files of Debian's ``dataset-fashion-mnist``; scikit-learn's digits when
they are missing) and is evaluated in eval mode, as deployed (moving statistics; with one
sample per group, each sample's own: the layers' default ``eval_statistics="auto"``).

    python examples/train_minimal.py                        # 600 steps (1.3 epochs)
    STEPS=4 SUBSET=256 python examples/train_minimal.py     # a smoke run in seconds
"""

import gzip
import math
import os
import struct
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kalmannorm

# -- hyper-parameters -------------------------------------------------------------------------
NORM = "bkn-flow"  # the recommended BKN (`kalmannorm norms`); try "bn" (ghost BN) or "gn"
STAT_BATCH = 2  # samples per statistics group
CENTRED = True  # every convolution's weights centred over its fan-in (MABN's paper does this)
BATCH = 128  # samples per optimizer step
STEPS = int(os.environ.get("STEPS", 600))
EVAL_EVERY = int(os.environ.get("EVAL_EVERY", 100))
LR, WARMUP, MOMENTUM, WEIGHT_DECAY = 0.1, 60, 0.9, 5e-4  # SGD, linear warm-up, cosine decay
WIDTHS, BLOCKS = (16, 32, 64), 3  # three stages of three blocks: ResNet-20
PAD = 2  # augmentation: random crops of the image padded by 2 pixels (and flips)
SUBSET = int(os.environ.get("SUBSET", 0))  # train and test on this many images (0: all)
DATA_DIR = Path(os.environ.get("DATA_DIR", "/usr/share/datasets/fashion-mnist"))
SEED = 0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- data: tensors on the device --------------------------------------------------------------
def read_idx(path: Path) -> torch.Tensor:
    """One idx file (MNIST's format: magic, big-endian sizes, uint8 data), gzipped or not."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def load_data():
    """``(train_x, train_y, test_x, test_y, name)``: images (N, 1, H, W) in [0, 1], labels."""
    names = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    paths = [
        next((p for p in (DATA_DIR / n, DATA_DIR / f"{n}.gz") if p.is_file()), None) for n in names
    ]
    if all(paths):
        x, y, test_x, test_y = (read_idx(p) for p in paths)
        return x[:, None] / 255.0, y.long(), test_x[:, None] / 255.0, test_y.long(), "fashion"
    from sklearn.datasets import load_digits  # 1,797 8x8 digits: 1,437 train, 360 test

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    return x[train], y[train], x[test], y[test], "digits"


def augment(x: torch.Tensor, flip: bool) -> torch.Tensor:
    """Each image cropped at a random offset of its zero-padded copy, half of them mirrored."""
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = torch.randint(0, 2 * PAD + 1, (n, 1, 1), device=x.device)
    cols = torch.randint(0, 2 * PAD + 1, (n, 1, 1), device=x.device)
    rows = rows + torch.arange(h, device=x.device)[:, None]  # (n, h, 1)
    cols = cols + torch.arange(w, device=x.device)  # (n, 1, w)
    x = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]  # (n, h, w, c)
    x = x.permute(0, 3, 1, 2)
    if flip:
        x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x


# -- model: a pre-activation ResNet with plain BatchNorm, converted below ---------------------
class Block(nn.Module):
    """BN-ReLU-conv twice, plus the shortcut (a 1x1 convolution where the shape changes)."""

    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.project = nn.Conv2d(c_in, c, 1, stride, bias=False) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.project is None else self.project(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


def preact_resnet(num_classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(1, WIDTHS[0], 3, padding=1, bias=False)]
    for stage, width in enumerate(WIDTHS):
        for block in range(BLOCKS):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(Block(WIDTHS[max(stage - 1, 0)] if block == 0 else width, width, stride))
    head = [nn.BatchNorm2d(WIDTHS[-1]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, *head, nn.Linear(WIDTHS[-1], num_classes))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Test accuracy in eval mode (no dependence on the other samples of the batch)."""
    model.eval()
    correct = sum(
        (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()
        for i in range(0, len(y), batch)
    )
    model.train()
    return float(correct) / len(y)


# -- training ---------------------------------------------------------------------------------
def main() -> None:
    torch.manual_seed(SEED)
    train_x, train_y, test_x, test_y, name = load_data()
    if SUBSET:
        train_x, train_y, test_x, test_y = (t[:SUBSET] for t in (train_x, train_y, test_x, test_y))
    mean, std = train_x.mean(), train_x.std()
    train_x, test_x = ((t - mean) / std for t in (train_x, test_x))
    train_x, train_y, test_x, test_y = (t.to(DEVICE) for t in (train_x, train_y, test_x, test_y))

    model = preact_resnet()
    model = kalmannorm.convert_norm(model, NORM, stat_batch_size=STAT_BATCH)  # BN -> BKN
    if CENTRED:
        kalmannorm.center_conv_weights(model, layers="all")  # conv(x, W - mean(W))
    model = model.to(DEVICE)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
    )

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
        return min((step + 1) / WARMUP, 0.5 * (1 + math.cos(math.pi * step / STEPS)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    steps_per_epoch = len(train_y) // BATCH
    print(
        f"{NORM}, statistics groups of {STAT_BATCH} in batches of {BATCH}: {STEPS} steps on "
        f"{len(train_y)} {name} images ({DEVICE})"
    )

    loss_sum, start = torch.zeros((), device=DEVICE), time.perf_counter()
    for step in range(STEPS):
        if step % steps_per_epoch == 0:  # a new epoch: a new order
            order = torch.randperm(len(train_y), device=DEVICE)
        batch = order[step % steps_per_epoch * BATCH :][:BATCH]
        loss = F.cross_entropy(
            model(augment(train_x[batch], flip=name == "fashion")), train_y[batch]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()  # summed on the device: the step never waits for the host
        if (step + 1) % EVAL_EVERY == 0 or step + 1 == STEPS:
            done = (step + 1) % EVAL_EVERY or EVAL_EVERY
            print(
                f"step {step + 1:5d}  train loss {loss_sum.item() / done:.4f}  test accuracy "
                f"(eval mode) {accuracy(model, test_x, test_y):.4f}  "
                f"{time.perf_counter() - start:.0f} s"
            )
            loss_sum.zero_()


if __name__ == "__main__":
    main()
