"""Sweep the initial gain q, process noise R and transition A of Batch Kalman Normalization.

A small CNN (4 x conv + norm + ReLU, global average pool, linear) is trained on a subset of
Fashion-MNIST with gradient batch 64 and statistics batch s = 2 (micro-batch statistics), once per
candidate initialisation, and compared with two references:

    bn-full   plain nn.BatchNorm2d over the whole gradient batch (the upper reference)
    bn-s2     BatchNorm with statistics groups of s (BKN with gain 1 fixed, which is exactly that)

Every run is evaluated on the full 10k test set twice: with moving statistics (``model.eval()``)
and with batch statistics in test groups of s (``set_eval_statistics(model, "batch")``). The
learned gain q and noise R of each Kalman layer are recorded at the end of training.

Each finished run is appended as one JSON line to ``--results`` so several processes can share the
work (e.g. two processes with ``--threads 1`` on a 2-core machine); ``--table`` only prints the
table of what that file holds.

    python experiments/init_sweep.py --seeds 0 1 --results experiments/init_sweep.jsonl
    python experiments/init_sweep.py --table --results experiments/init_sweep.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import struct
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as torch_f

import kalmannorm
from kalmannorm.layers.batch_kalman import BatchKalmanNorm

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

# name -> (norm, options for convert_norm, std of the transition init relative to 1/sqrt(fan_in)
#          [, conv init: "default" (kaiming_uniform, a=sqrt 5) or "kaiming" (fan_out, relu)])
CONFIGS: dict[str, tuple] = {
    "bn-full": ("bn", {}, 0.0),
    "bn-s2": ("bkn", {"gain": 1.0, "learn_gain": False}, 0.0),
    "q0.5-R1": ("bkn", {"gain": 0.5, "noise": 1.0}, 0.0),
    "q0.9-R1": ("bkn", {"gain": 0.9, "noise": 1.0}, 0.0),
    "q0.99-R1": ("bkn", {"gain": 0.99, "noise": 1.0}, 0.0),
    "q0.9-R0.1": ("bkn", {"gain": 0.9, "noise": 0.1}, 0.0),
    "q0.9-R1-Arand0.01": ("bkn", {"gain": 0.9, "noise": 1.0}, 0.01),
    "q0.9-R1-Arand1": ("bkn", {"gain": 0.9, "noise": 1.0}, 1.0),
    "propagate": ("bkn", {"prior": "propagate"}, 0.0),
    # the same two with torchvision-style conv init (activations with ~3-10x the variance)
    "bn-s2-kaiming": ("bkn", {"gain": 1.0, "learn_gain": False}, 0.0, "kaiming"),
    "q0.9-R1-kaiming": ("bkn", {"gain": 0.9, "noise": 1.0}, 0.0, "kaiming"),
}


# -- data -------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x00 0x00 dtype ndim, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_idx(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(
        f"{data_dir / stem}[.gz] not found: apt-get install dataset-fashion-mnist, or --data-dir"
    )


def load_fashion_mnist(data_dir: Path, train_size: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test); a fixed random training subset, standardised."""
    x_train = read_idx(find_idx(data_dir, "train-images-idx3-ubyte"))
    y_train = read_idx(find_idx(data_dir, "train-labels-idx1-ubyte"))
    x_test = read_idx(find_idx(data_dir, "t10k-images-idx3-ubyte"))
    y_test = read_idx(find_idx(data_dir, "t10k-labels-idx1-ubyte"))
    subset = np.random.default_rng(0).permutation(len(x_train))[:train_size]
    x_train, y_train = x_train[subset], y_train[subset]
    mean, std = x_train.mean() / 255.0, x_train.std() / 255.0

    def prepare(x: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(x.astype(np.float32)) / 255.0 - mean) / std).unsqueeze(1)

    return (
        prepare(x_train),
        torch.from_numpy(y_train.astype(np.int64)),
        prepare(x_test),
        torch.from_numpy(y_test.astype(np.int64)),
    )


# -- model ------------------------------------------------------------------------------------


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    """conv32 - conv32/2 - conv64 - conv64/2, each + BatchNorm2d + ReLU; avg pool; linear."""
    layers: list[nn.Module] = []
    widths = [(1, 32, 1), (32, 32, 2), (32, 64, 1), (64, 64, 2)]
    for c_in, c_out, stride in widths:
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def build_model(config: str, stat_batch_size: int, seed: int) -> nn.Module:
    norm, options, a_std, *rest = CONFIGS[config]
    torch.manual_seed(seed)
    model = small_cnn()
    if rest and rest[0] == "kaiming":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if norm == "bkn":
        kalmannorm.convert_norm(model, "bkn", stat_batch_size=stat_batch_size, **options)
        for layer in kalman_layers(model):
            if layer.transition is not None and a_std > 0:
                fan_in = layer.transition.shape[1]
                nn.init.normal_(layer.transition, std=a_std / math.sqrt(fan_in))
    return model


def layer_mean(value: torch.Tensor | None) -> float | None:
    """Mean of a per-channel Kalman quantity (``None`` for a layer without upstream)."""
    return None if value is None else float(value.detach().mean())


def kalman_layers(model: nn.Module) -> list[BatchKalmanNorm]:
    return [m for m in model.modules() if isinstance(m, BatchKalmanNorm)]


def optimizer_for(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on conv/linear weights only."""
    decayed = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ids = {id(p) for p in decayed}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    return torch.optim.SGD(
        [{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
    )


# -- one run ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    return correct / len(x)


def run(config: str, seed: int, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> dict:
    x_train, y_train, x_test, y_test = data
    model = build_model(config, args.stat_batch_size, seed)
    opt = optimizer_for(model, args.lr, args.weight_decay)
    steps_per_epoch = len(x_train) // args.batch_size
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
    )
    generator = torch.Generator().manual_seed(seed)
    result: dict = {"config": config, "seed": seed, "steps": total, "status": "ok"}
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    try:
        for _ in range(args.epochs):
            order = torch.randperm(len(x_train), generator=generator)
            for step in range(steps_per_epoch):
                idx = order[step * args.batch_size : (step + 1) * args.batch_size]
                loss = torch_f.cross_entropy(model(x_train[idx]), y_train[idx])
                if not torch.isfinite(loss):
                    raise FloatingPointError("non-finite loss")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
    except FloatingPointError as error:
        result["status"] = f"diverged at step {len(losses)}: {str(error)[:80]}"
    result["train_s"] = time.perf_counter() - start
    # mean training loss over the last quarter epoch
    tail = losses[-steps_per_epoch // 4 :]
    result["final_train_loss"] = statistics.fmean(tail) if tail else None

    model.eval()
    start = time.perf_counter()
    if result["status"] == "ok":
        result["acc_moving"] = evaluate(model, x_test, y_test, args.test_batch_size)
        if kalman_layers(model):
            kalmannorm.set_eval_statistics(model, "batch")
            result["acc_batch"] = evaluate(model, x_test, y_test, args.test_batch_size)
            kalmannorm.set_eval_statistics(model, "moving")
    result["eval_s"] = time.perf_counter() - start
    layers = kalman_layers(model)
    result["gain"] = [layer_mean(layer.gain) for layer in layers]
    result["noise"] = [layer_mean(layer.noise) for layer in layers]
    result["transition_rms"] = [
        layer_mean(layer.transition.square()) ** 0.5 if layer.transition is not None else None
        for layer in layers
    ]
    return result


# -- table ------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def fmt_list(rows: list[dict], key: str) -> str:
    """Per-layer mean over seeds of a per-layer quantity (layers without upstream skipped)."""
    per_layer = list(zip(*(r[key] for r in rows if r.get(key))))
    cells = [statistics.fmean(v) for v in per_layer if all(x is not None for x in v)]
    return " ".join(f"{c:.3g}" for c in cells) or "-"


def table(results: list[dict]) -> str:
    header = (
        "| config | seeds | test acc, moving (%) | test acc, batch s=2 (%) | per-seed (moving) | "
        "train loss | learned q (layers 2-4) | learned R (layers 2-4) | s/run |"
    )
    lines = [header, "|" + "---|" * 9]
    order = {name: i for i, name in enumerate(CONFIGS)}
    for config in sorted({r["config"] for r in results}, key=lambda c: order.get(c, 99)):
        rows = [r for r in results if r["config"] == config]
        ok = [r for r in rows if r["status"] == "ok"]
        bad = [r for r in rows if r["status"] != "ok"]
        by_seed = sorted(ok, key=lambda r: r["seed"])
        per_seed = ", ".join(f"{100 * r['acc_moving']:.2f}" for r in by_seed)
        if bad:
            per_seed += "; " + "; ".join(f"seed {r['seed']} {r['status']}" for r in bad)
        lines.append(
            f"| {config} | {len(rows)} | {mean_std([r['acc_moving'] for r in ok])} | "
            f"{mean_std([r['acc_batch'] for r in ok if 'acc_batch' in r])} | {per_seed} | "
            f"{statistics.fmean(r['final_train_loss'] for r in ok):.3f} | "
            f"{fmt_list(rows, 'gain')} | {fmt_list(rows, 'noise')} | "
            f"{statistics.fmean(r['train_s'] for r in rows):.0f} |"
            if ok
            else f"| {config} | {len(rows)} | - | - | {per_seed} | - | - | - | - |"
        )
    return "\n".join(lines)


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stat-batch-size", type=int, default=2)
    parser.add_argument("--test-batch-size", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--results", type=Path, default=Path("init_sweep.jsonl"))
    parser.add_argument("--table", action="store_true", help="only print the table of --results")
    args = parser.parse_args()
    if args.test_batch_size % args.stat_batch_size:
        parser.error("--test-batch-size must be a multiple of --stat-batch-size")

    if not args.table:
        torch.set_num_threads(args.threads)
        data = load_fashion_mnist(args.data_dir, args.train_size)
        done = {(r["config"], r["seed"]) for r in load_results(args.results)}
        for seed in args.seeds:
            for config in args.configs:
                if (config, seed) in done:
                    continue
                result = run(config, seed, data, args)
                result["args"] = {k: str(v) for k, v in vars(args).items() if k != "configs"}
                with args.results.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                accs = [result.get(k) for k in ("acc_moving", "acc_batch")]
                moving, batch = (f"{100 * a:.2f}" if a is not None else "-" for a in accs)
                print(
                    f"{config:>20} seed {seed}: {result['status']}, moving {moving}, "
                    f"batch {batch}, train {result['train_s']:.0f}s",
                    flush=True,
                )
    print(table(load_results(args.results)))


if __name__ == "__main__":
    main()
