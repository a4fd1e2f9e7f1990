"""Where the ATen calls of a converted model's training step come from (issue 17, the hot path).

Counts every ATen call of one forward + backward (as ``kalmannorm bench``'s ``aten_calls``) and
attributes it to the innermost library function that issued it: from the Python stack for the
forward and for the fused node's own backward (its nested ``torch.autograd.grad``), and for the
autograd engine's backward of composite code from the forward stack recorded on each autograd
node (anomaly mode, ``check_nan=False``: it adds no ATen call). Then groups the functions into
the parts of a Kalman layer: the data-flow moment programs (``dataflow.py``/``moments.py`` and
the moment rules of ``functional.py``), the fused node's forward and backward, the Kalman
estimate, moving averages, checks and diagnostics.

Usage: python experiments/aten_call_sources.py [--model resnet50] [--norm bkn-flow] [--batch 4]
[--size 64] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import torch
import torchvision
from torch.nn import functional as torch_f
from torch.utils._python_dispatch import TorchDispatchMode

import kalmannorm
from kalmannorm._torch_private import OBSERVING_MODE
from kalmannorm.chain import is_chain_member

ROOT = os.path.dirname(kalmannorm.__file__)
_TRACEBACK_LINE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')

#: function (file:name) -> part of the layer; the first matching prefix wins.
PARTS = (
    ("moments.py:", "data-flow moment programs"),
    ("dataflow.py:", "data-flow moment programs"),
    ("functional.py:relu_moments", "data-flow moment programs"),
    ("functional.py:_relu_moment_terms", "data-flow moment programs"),
    ("functional.py:forward", "data-flow moment programs"),  # _ReluMoments, the one Function
    ("functional.py:backward", "data-flow moment programs"),
    ("functional.py:safe_std", "data-flow moment programs"),
    ("functional.py:linear_moments", "data-flow moment programs"),
    ("functional.py:predict_data_flow_prior", "Kalman estimate (prior, Eq. 5, affine)"),
    ("functional.py:kalman_update", "Kalman estimate (prior, Eq. 5, affine)"),
    ("functional.py:affine_from_statistics", "Kalman estimate (prior, Eq. 5, affine)"),
    ("layers/base.py:estimate", "Kalman estimate (prior, Eq. 5, affine)"),
    ("layers/batch_kalman.py:estimate", "Kalman estimate (prior, Eq. 5, affine)"),
    ("functional.py:exponential_average", "moving averages"),
    ("layers/batch_kalman.py:_update_running_stats", "moving averages"),
    ("layers/base.py:check_statistics", "checks and diagnostics"),
    ("layers/base.py:record", "checks and diagnostics"),
    ("fused.py:_cancels", "checks and diagnostics"),
    ("layers/base.py:fused_step", "fused node, forward"),
    ("layers/batch_kalman.py:_forward_fused", "fused node, forward"),
)

#: Operations that only make a new view or alias of a tensor (no kernel runs on a GPU).
VIEWS = frozenset(
    [
        "view",
        "_unsafe_view",
        "permute",
        "unsqueeze",
        "squeeze",
        "expand",
        "detach",
        "select",
        "slice",
        "t",
        "transpose",
        "as_strided",
        "alias",
        "unflatten",
        "lift_fresh",
        "_reshape_alias",
        "diagonal",
        "unbind",
        "split",
    ]
)


def _library_frames_on_stack() -> list[str]:
    frame, out = sys._getframe(2), []
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(ROOT) and f"{os.sep}lab{os.sep}" not in name:
            out.append(f"{os.path.relpath(name, ROOT)}:{frame.f_code.co_name}")
        frame = frame.f_back
    return out  # innermost first


def _library_frames_of_node() -> list[str]:
    node = torch._C._current_autograd_node()
    if node is None:
        return []
    trace = node.metadata.get("traceback_", "")
    if not isinstance(trace, str):
        trace = "".join(trace)
    out = [
        f"{os.path.relpath(name, ROOT)}:{function}"
        for name, _, function in _TRACEBACK_LINE.findall(trace)
        if name.startswith(ROOT) and f"{os.sep}lab{os.sep}" not in name
    ]
    return out[::-1]


def part_of(function: str, phase: str, frames: list[str]) -> str:
    for prefix, part in PARTS:
        if function.startswith(prefix):
            return part
    if function.startswith("fused.py:") or function.startswith("_torch_private.py:"):
        return f"fused node, {'backward' if 'backward' in phase else 'forward'}"
    if any(f.startswith("fused.py:backward") for f in frames):
        return "fused node, backward"
    if function == "(model)":
        return "the model's own operations"
    return f"other library code ({function})"


class _Attribution(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.functions: collections.Counter = collections.Counter()
        self.parts: collections.Counter = collections.Counter()
        self.ops: collections.Counter = collections.Counter()
        # it runs every operation as called: the library's cached constants serve under it,
        # so the calls are those of an uncounted step (as kalmannorm bench counts them)
        setattr(self, OBSERVING_MODE, True)
        self.computing: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frames = _library_frames_on_stack()
        in_backward = torch._C._current_autograd_node() is not None
        if frames:
            phase = "backward (fused node)" if in_backward else "forward"
        else:
            frames = _library_frames_of_node()
            phase = "backward" if in_backward else "forward"
        function = frames[0] if frames else "(model)"
        self.functions[(phase, function)] += 1
        part = part_of(function, phase, frames)
        self.parts[part] += 1
        if func.overloadpacket.__name__ not in VIEWS:
            self.computing[part] += 1
        self.ops[(function, func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision classification model")
    parser.add_argument("--norm", default="bkn-flow")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--stat-batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).train()
    if args.norm != "torch_bn":
        # a norm with per-sample statistics (gn, gkn, ...) takes no statistics batch
        grouped = kalmannorm.norm_spec(args.norm).batch_statistics
        options = {"stat_batch_size": args.stat_batch} if grouped else {}
        model = kalmannorm.convert_norm(model, args.norm, example_input=x, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

    def forward_backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch_f.cross_entropy(model(x), y).backward()

    forward_backward()
    optimizer.step()
    with torch.autograd.set_detect_anomaly(True, check_nan=False):
        forward_backward()  # nodes made under anomaly mode carry their forward stack
        mode = _Attribution()
        with mode:
            forward_backward()
    layers = sum(1 for m in model.modules() if is_chain_member(m)) or 1
    total, computing = sum(mode.parts.values()), sum(mode.computing.values())
    print(
        f"{args.model}, {args.norm}, batch {args.batch}, {args.size} px: {total:,} ATen calls in "
        f"one forward + backward ({computing:,} not views or detaches), {layers} Kalman layers "
        f"({total / layers:.0f} per layer)\n"
    )
    print("| part | calls | per layer | share | not views |\n|---|---:|---:|---:|---:|")
    for part, n in mode.parts.most_common():
        print(f"| {part} | {n:,} | {n / layers:.1f} | {n / total:.0%} | {mode.computing[part]:,} |")
    print("\n| phase | innermost library function | calls | per layer |\n|---|---|---:|---:|")
    for (phase, function), n in mode.functions.most_common(args.top):
        print(f"| {phase} | `{function}` | {n:,} | {n / layers:.1f} |")
    print("\n| function | ATen op | calls |\n|---|---|---:|")
    for (function, op), n in mode.ops.most_common(args.top):
        print(f"| `{function}` | {op} | {n:,} |")


if __name__ == "__main__":
    main()
