"""Which tensors feed each Kalman layer, and how to predict their moments from other layers.

:func:`trace` runs one forward pass and records, for every tensor, the operation that made it
(module outputs through forward hooks on the modules it models, everything between them through a
:class:`~torch.overrides.TorchFunctionMode`). :func:`compile_programs` turns that record into one
*moment program* per Kalman layer: a small expression tree whose leaves are statistics other Kalman
layers publish in the same pass and whose inner nodes are the operations in between
(:mod:`kalmannorm.moments`). Evaluating it predicts the moments of the layer's input tensor:

* the output of a Kalman layer j: y = gamma (x - mu) / sqrt(sigma^2 + eps) + beta, with the
  moments of its input (``source="batch"``: the group's xbar, S; ``source="posterior"``: the
  posterior) — or, in the authors' variant (``raw=True``), the raw posterior itself;
* a tensor that is also the *input* of a Kalman layer j that ran before: j's statistics of it
  (exact for the batch; this is what a residual stream between two additions is);
* activations, convolutions and linear layers (zero padding accounted for, unless ``raw``),
  residual additions and scalings, channel concatenation, average/max/global pooling, dropout,
  upsampling, flattening and the shape-only operations.

An operation it cannot model (a product of two activations, channel slicing, an unconverted norm)
leaves the layer without a program: it uses its batch statistics alone, and :func:`link_chain`
warns once per model, naming the operations and layers.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from kalmannorm import moments as mo
from kalmannorm._torch_private import ConvNd, ConvTransposeNd, NormBase
from kalmannorm.moments import Moments

if TYPE_CHECKING:
    from kalmannorm.chain import Published

ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.ELU: "elu",
    nn.Mish: "mish",
    nn.LeakyReLU: "leaky_relu",
}
_IDENTITY_MODULES = (nn.Identity, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_OPAQUE_MODULES = (
    NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    ConvTransposeNd, nn.MultiheadAttention,
)  # fmt: skip
_FUNCTION_ACTIVATIONS = {
    "relu", "relu6", "silu", "gelu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "elu",
    "mish", "leaky_relu",
}  # fmt: skip
_SHAPE_ONLY = {
    "contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type_as", "detach",
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "alias",
}  # fmt: skip


def _ntuple(value: object, dims: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    return tuple(int(v) for v in value)


# -- the record of one traced pass ----------------------------------------------------------------


@dataclass(eq=False)
class TensorRecord:
    """A tensor of the traced pass: the operation that produced it and its inputs."""

    op: str
    inputs: list[TensorRecord] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    #: chain positions of the Kalman layers that took this tensor as their input
    consumed_by: list[int] = field(default_factory=list)


@dataclass
class Trace:
    """Kalman layers in execution order, their names and the records of their input tensors."""

    layers: list[nn.Module]
    names: list[str]
    inputs: list[TensorRecord]


class _Recorder(TorchFunctionMode):
    """Assigns a :class:`TensorRecord` to every tensor made outside a modelled module."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[int, TensorRecord] = {}
        self.alive: list[Tensor] = []  # keeps ids unique during the pass
        self.depth = 0

    def record_of(self, t: object) -> TensorRecord | None:
        return self.records.get(id(t)) if isinstance(t, Tensor) else None

    def assign(self, t: Tensor, record: TensorRecord) -> None:
        record.shape = tuple(t.shape)
        self.records[id(t)] = record
        self.alive.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self._record_function(func, args, kwargs, out)
        return out

    def _record_function(self, func, args, kwargs, out) -> None:
        outputs = [out] if isinstance(out, Tensor) else []
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            outputs = [out[0]]  # max_pool with indices, etc.: the values
        if not outputs:
            return
        flat = list(args) + list(kwargs.values())
        if flat and isinstance(flat[0], list | tuple):
            flat = list(flat[0]) + flat[1:]
        sources = [self.record_of(a) for a in flat if self.record_of(a) is not None]
        if not sources:
            return
        name = getattr(func, "__name__", str(func)).strip("_")
        record = _function_record(name, args, kwargs, sources, self, outputs[0])
        self.assign(outputs[0], record)


def _scalar(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _function_record(
    name: str, args: tuple, kwargs: dict, sources: list[TensorRecord], rec: _Recorder, out: Tensor
) -> TensorRecord:
    """The record of a functional operation on tracked tensors."""
    first = args[0] if args else None
    first_record = rec.record_of(first)
    name = {"iadd": "add", "radd": "add", "add_": "add", "isub": "sub", "sub_": "sub",
            "imul": "mul", "rmul": "mul", "mul_": "mul", "itruediv": "div", "truediv": "div",
            "div_": "div", "relu_": "relu", "hardtanh_": "hardtanh", "silu_": "silu",
            "leaky_relu_": "leaky_relu", "sigmoid_": "sigmoid", "tanh_": "tanh",
            "hardswish_": "hardswish", "mean_": "mean"}.get(name, name)  # fmt: skip
    if name in ("add", "sub", "rsub"):
        other = args[1] if len(args) > 1 else kwargs.get("other")
        alpha = float(kwargs.get("alpha", 1.0))
        sign = -1.0 if name == "sub" else 1.0
        if name == "rsub":
            return TensorRecord("unmodelled", sources, {"reason": "rsub"})
        other_record = rec.record_of(other)
        if first_record is not None and other_record is not None:
            scales = [1.0, sign * alpha]
            return TensorRecord("sum", [first_record, other_record], {"scales": scales})
        constant = _scalar(other)
        if first_record is not None and constant is not None:
            return TensorRecord("affine", [first_record], {"scale": 1.0, "shift": sign * constant})
        return TensorRecord("unmodelled", sources, {"reason": f"{name} of a non-scalar constant"})
    if name in ("mul", "div"):
        other = args[1] if len(args) > 1 else kwargs.get("other")
        constant = _scalar(other)
        if first_record is not None and constant is not None and constant != 0:
            scale = constant if name == "mul" else 1.0 / constant
            return TensorRecord("affine", [first_record], {"scale": scale, "shift": 0.0})
        constant = _scalar(first)
        if name == "mul" and constant is not None and rec.record_of(other) is not None:
            return TensorRecord("affine", [rec.record_of(other)], {"scale": constant, "shift": 0.0})
        return TensorRecord("unmodelled", sources, {"reason": f"{name} of two tensors"})
    if name == "neg" and first_record is not None:
        return TensorRecord("affine", [first_record], {"scale": -1.0, "shift": 0.0})
    if name == "hardtanh":
        low = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        high = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        if (low, high) == (0.0, 6.0):
            return TensorRecord("activation", [first_record], {"kind": "relu6"})
        return TensorRecord("unmodelled", sources, {"reason": "hardtanh"})
    if name in _FUNCTION_ACTIVATIONS and first_record is not None:
        info = {"kind": name}
        if name == "gelu" and kwargs.get("approximate", "none") == "tanh":
            info["kind"] = "gelu_tanh"
        if name == "leaky_relu":
            info["slope"] = float(args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01))
        return TensorRecord("activation", [first_record], info)
    if name in _SHAPE_ONLY and first_record is not None:
        return first_record
    if name == "dropout" and first_record is not None:
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        return TensorRecord("dropout", [first_record], {"p": float(p)})
    if name == "cat":
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        tensors = args[0]
        records = [rec.record_of(t) for t in tensors]
        if dim in (1, -out.dim() + 1) and all(r is not None for r in records):
            return TensorRecord("cat", records)
        return TensorRecord("unmodelled", sources, {"reason": f"cat along dim {dim}"})
    if first_record is not None and name in ("flatten", "view", "reshape", "squeeze", "unsqueeze"):
        return _reshape_record(first, first_record, out, name)
    if first_record is not None and name == "mean":
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        spatial = {d % first.dim() for d in dims}
        if first.dim() > 2 and spatial == set(range(2, first.dim())):
            return TensorRecord("pool", [first_record], _global_pool(first, "avg"))
        return TensorRecord("unmodelled", sources, {"reason": f"mean over dims {dims}"})
    if first_record is not None and "pool" in name:
        return _pool_function_record(name, first, first_record, args, kwargs)
    return TensorRecord("unmodelled", sources, {"reason": name})


def _reshape_record(x: Tensor, record: TensorRecord, out: Tensor, name: str) -> TensorRecord:
    """Shape changes that keep (N, C, ...) or flatten channels and positions into features."""
    keeps_channels = out.dim() >= 2 and tuple(out.shape[:2]) == tuple(x.shape[:2])
    if keeps_channels and math.prod(out.shape[2:]) == math.prod(x.shape[2:]):
        return record
    flattens = out.dim() == 2 and x.dim() > 2 and out.shape[0] == x.shape[0]
    if flattens and out.shape[1] == math.prod(x.shape[1:]):
        return TensorRecord("repeat", [record], {"repeats": math.prod(x.shape[2:])})
    return TensorRecord("unmodelled", [record], {"reason": f"{name} to {tuple(out.shape)}"})


def _global_pool(x: Tensor, kind: str) -> dict:
    sizes = tuple(x.shape[2:])
    return {"kind": kind, "sizes": sizes, "kernel": sizes, "stride": sizes,
            "padding": (0,) * len(sizes), "include_padding": True,
            "taps": math.prod(sizes)}  # fmt: skip


def _adaptive_pool(x: Tensor, output_size: object, kind: str) -> dict:
    """An adaptive pool's bins: exact for sizes that divide, else the mean bin."""
    sizes = tuple(x.shape[2:])
    outs = _ntuple(output_size, len(sizes))
    outs = tuple(s if o is None else o for o, s in zip(outs, sizes))
    kernel = tuple(max(1, s // o) for s, o in zip(sizes, outs))
    return {"kind": kind, "sizes": sizes, "kernel": kernel, "stride": kernel,
            "padding": (0,) * len(sizes), "include_padding": True,
            "taps": math.prod(kernel)}  # fmt: skip


def _pool_info(x: Tensor, kind: str, kernel, stride, padding, include_padding=True) -> dict:
    dims = x.dim() - 2
    kernel = _ntuple(kernel, dims)
    stride = kernel if stride is None or stride == [] or stride == () else _ntuple(stride, dims)
    return {"kind": kind, "sizes": tuple(x.shape[2:]), "kernel": kernel, "stride": stride,
            "padding": _ntuple(padding, dims), "include_padding": include_padding,
            "taps": math.prod(kernel)}  # fmt: skip


def _pool_function_record(name, x, record, args, kwargs) -> TensorRecord:
    kind = "max" if "max" in name else "avg"
    if "adaptive" in name:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        return TensorRecord("pool", [record], _adaptive_pool(x, size, kind))
    kernel = args[1] if len(args) > 1 else kwargs.get("kernel_size")
    stride = args[2] if len(args) > 2 else kwargs.get("stride")
    padding = args[3] if len(args) > 3 else kwargs.get("padding", 0)
    include = kwargs.get("count_include_pad", args[5] if len(args) > 5 else True)
    if kind == "max" and (kwargs.get("dilation", 1) not in (1, (1, 1)) or len(args) > 4):
        return TensorRecord("unmodelled", [record], {"reason": "dilated max pooling"})
    return TensorRecord("pool", [record], _pool_info(x, kind, kernel, stride, padding, include))


def _module_record(module: nn.Module, x: Tensor, record: TensorRecord | None) -> TensorRecord:
    """The record of a modelled module's output, given its input's record."""
    if record is None:
        return TensorRecord("input", [], {"reason": type(module).__name__})
    if isinstance(module, ConvNd) and not isinstance(module, ConvTransposeNd):
        return TensorRecord("conv", [record], {"module": module, "sizes": tuple(x.shape[2:])})
    if isinstance(module, nn.Linear):
        return TensorRecord("conv", [record], {"module": module, "sizes": ()})
    for kind_type, kind in ACTIVATION_MODULES.items():
        if isinstance(module, kind_type):
            info = {"kind": kind}
            if kind == "gelu" and module.approximate == "tanh":
                info["kind"] = "gelu_tanh"
            if kind == "leaky_relu":
                info["slope"] = module.negative_slope
            return TensorRecord("activation", [record], info)
    if isinstance(module, _IDENTITY_MODULES):
        return record
    if isinstance(module, _DROPOUT_MODULES):
        return TensorRecord("dropout", [record], {"p": float(module.p)})
    if isinstance(module, nn.Flatten):
        return TensorRecord("repeat", [record], {"repeats": math.prod(x.shape[2:])})
    if isinstance(module, _POOL_MODULES):
        return _pool_module_record(module, x, record)
    return TensorRecord("unmodelled", [record], {"reason": type(module).__name__})


def _pool_module_record(module: nn.Module, x: Tensor, record: TensorRecord) -> TensorRecord:
    name = type(module).__name__.lower()
    kind = "max" if "max" in name else "avg"
    if "adaptive" in name:
        return TensorRecord("pool", [record], _adaptive_pool(x, module.output_size, kind))
    if kind == "max" and _ntuple(module.dilation, x.dim() - 2) != (1,) * (x.dim() - 2):
        return TensorRecord("unmodelled", [record], {"reason": "dilated max pooling"})
    include = getattr(module, "count_include_pad", True)
    info = _pool_info(x, kind, module.kernel_size, module.stride, module.padding, include)
    return TensorRecord("pool", [record], info)


def _modelled(module: nn.Module) -> bool:
    types = (ConvNd, nn.Linear, nn.Flatten, *ACTIVATION_MODULES,
             *_IDENTITY_MODULES, *_DROPOUT_MODULES, *_POOL_MODULES, *_OPAQUE_MODULES)  # fmt: skip
    return isinstance(module, types)


def trace(root: nn.Module, example_input: object, is_kalman) -> Trace:
    """Run ``root`` once on ``example_input`` (no grad, every buffer restored) and record which
    tensor feeds each Kalman layer (``is_kalman(module)``) and how it was made.

    Kalman layers (and modules with a boolean ``tracing`` flag) pass their input through during
    the pass, as a copy, so that a layer's output is a tensor of its own.
    """
    recorder = _Recorder()
    names = {id(m): n for n, m in root.named_modules()}
    found: list[tuple[nn.Module, TensorRecord]] = []
    handles = []

    def enter(module: nn.Module, args: tuple) -> None:
        if is_kalman(module):
            if any(layer is module for layer, _ in found):
                raise ValueError(
                    f"Kalman layer '{names[id(module)]}' runs more than once per forward pass; a "
                    f"chain needs each layer once. Give each call its own normalization layer."
                )
            x = args[0] if args else None
            record = recorder.record_of(x) or TensorRecord("input", [], {"reason": "model input"})
            record.consumed_by.append(len(found))
            found.append((module, record))
        recorder.depth += 1

    def leave(module: nn.Module, args: tuple, out: object) -> None:
        recorder.depth -= 1
        if recorder.depth or not isinstance(out, Tensor):
            return
        if is_kalman(module):
            index = next(i for i, (layer, _) in enumerate(found) if layer is module)
            recorder.assign(out, TensorRecord("kalman", [], {"index": index}))
            return
        x = args[0] if args else None
        recorder.assign(out, _module_record(module, x, recorder.record_of(x)))

    for module in root.modules():
        if is_kalman(module) or _modelled(module):
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    for t in inputs:
        if isinstance(t, Tensor):
            recorder.assign(t, TensorRecord("input", [], {"reason": "model input"}))
    run_passing_through(root, example_input, handles, recorder)
    ran = {id(layer) for layer, _ in found}
    for module in root.modules():
        if is_kalman(module) and id(module) not in ran:
            # A branch the traced pass skipped (an auxiliary head in eval mode): the layer joins
            # the chain without a prior.
            found.append((module, TensorRecord("input", [], {"reason": "not run in the trace"})))
    return Trace([m for m, _ in found], [names[id(m)] for m, _ in found], [r for _, r in found])


def run_passing_through(
    root: nn.Module,
    example_input: object,
    handles: Sequence[torch.utils.hooks.RemovableHandle],
    mode: contextlib.AbstractContextManager | None = None,
) -> None:
    """One forward of ``root`` on ``example_input`` (a tensor, a tuple of positional arguments or
    a dict of keyword arguments) under ``torch.no_grad`` (and ``mode``), with every module that
    has a boolean ``tracing`` flag passing its input through; afterwards ``handles`` are removed,
    the flags reset and every buffer of ``root`` restored."""
    saved = {name: buf.clone() for name, buf in root.named_buffers()}
    passing = [m for m in root.modules() if isinstance(getattr(m, "tracing", None), bool)]
    was_tracing = [m.tracing for m in passing]
    for layer in passing:
        layer.tracing = True
    try:
        with torch.no_grad(), mode or contextlib.nullcontext():
            if isinstance(example_input, dict):
                root(**example_input)
            elif isinstance(example_input, tuple):
                root(*example_input)
            else:
                root(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for layer, flag in zip(passing, was_tracing):
            layer.tracing = flag
        with torch.no_grad():
            for name, buf in root.named_buffers():
                buf.copy_(saved[name])


# -- moment programs ------------------------------------------------------------------------------


class Context:
    """What a program reads while it is evaluated: the statistics published in this pass, and
    whether the convolutions' weights enter as constants (``detach_weights``: the reading
    layer's ``detach_prior_weights``)."""

    def __init__(self, published: Sequence[Published | None], names: Sequence[str], raw: bool,
                 source: str, training: bool, memo: dict,
                 detach_weights: bool = False) -> None:  # fmt: skip
        self.published, self.names, self.raw = published, names, raw
        self.source, self.training, self.memo = source, training, memo
        self.detach_weights = detach_weights

    def entry(self, index: int, reader: str) -> Published:
        from kalmannorm.chain import ChainOrderError

        entry = self.published[index]
        if entry is None:
            raise ChainOrderError(
                f"Kalman layer '{reader}' predicts its statistics from '{self.names[index]}', "
                f"which has not run in this forward pass. Run the whole model (model(x)), not a "
                f"part of it on its own; if the model runs its layers in another order or on "
                f"other data than the traced pass, relink with kalmannorm.link_chain(model, "
                f"example_input=x) on an input that runs the model as in training."
            )
        return entry


class Node:
    """A node of a moment program; :meth:`evaluate` returns the moments of its tensor."""

    children: tuple[Node, ...] = ()

    def evaluate(self, ctx: Context, reader: str) -> Moments:
        key = id(self)
        if key not in ctx.memo:
            ctx.memo[key] = self.compute(ctx, reader)
        return ctx.memo[key]

    def compute(self, ctx: Context, reader: str) -> Moments:
        raise NotImplementedError

    def producers(self) -> set[int]:
        """Chain positions of the layers whose statistics the program reads."""
        return set().union(*(c.producers() for c in self.children)) if self.children else set()


class LayerOutput(Node):
    """The output tensor of Kalman layer ``index``."""

    def __init__(self, index: int, layer: nn.Module) -> None:
        self.index, self.layer = index, layer

    def producers(self) -> set[int]:
        return {self.index}

    def compute(self, ctx: Context, reader: str) -> Moments:
        e = ctx.entry(self.index, reader)
        if ctx.raw:
            return Moments(e.mean, e.var)
        layer = self.layer
        if ctx.source == "posterior":
            return mo.posterior_output(e.mean, e.var, layer.weight, layer.bias, layer.eps)
        return mo.normalized_output(
            e.batch_mean, e.batch_var, e.mean, e.var, layer.weight, layer.bias, layer.eps
        )


class LayerInput(Node):
    """The input tensor of Kalman layer ``index`` (which ran earlier): its statistics."""

    def __init__(self, index: int) -> None:
        self.index = index

    def producers(self) -> set[int]:
        return {self.index}

    def compute(self, ctx: Context, reader: str) -> Moments:
        e = ctx.entry(self.index, reader)
        if ctx.raw or ctx.source == "posterior":
            return Moments(e.mean, e.var)
        return Moments(e.batch_mean, e.batch_var)


#: Non-decreasing activations: a maximum commutes with them.
MONOTONE_ACTIVATIONS = frozenset(
    {"relu", "relu6", "leaky_relu", "elu", "sigmoid", "tanh", "hardsigmoid"}
)


#: The entries of an operation's ``info`` that hold constant tensors (:meth:`Operation.place`).
PLACED_CONSTANTS = ("geometry", "raw_geometry", "quadrature")


class Operation(Node):
    """An operation between layers, applied to its children's moments."""

    def __init__(self, op: str, children: Sequence[Node], info: dict) -> None:
        self.op, self.children, self.info = op, tuple(children), info
        #: the constant tensors of ``info`` as built (float64, on the CPU), which
        #: :meth:`place` copies onto a device
        self.built_constants = {k: info[k] for k in PLACED_CONSTANTS if info.get(k) is not None}

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Keep this operation's constant tensors (tap geometries, quadrature nodes) on
        ``device`` in ``dtype``, copied from the built ones. An evaluation reads them as they
        lie: a CPU constant converted in every pass would be, on a GPU, a blocking copy from
        the host (one stream synchronisation each) and, compiled, a CPU input that keeps CUDA
        graphs off."""
        for key, value in self.built_constants.items():
            self.info[key] = _to(value, device, dtype)

    def compute(self, ctx: Context, reader: str) -> Moments:
        parts = [c.evaluate(ctx, reader) for c in self.children]
        info, op = self.info, self.op
        if op == "activation":
            return _activation(info, parts[0])
        if op == "conv":
            geometry = info["raw_geometry"] if ctx.raw else info["geometry"]
            return _conv_moments(info["module"], geometry, parts[0], ctx.detach_weights)
        if op == "sum":
            return mo.add(parts, info["scales"])
        if op == "affine":
            m, v = parts[0]
            return Moments(m * info["scale"] + info["shift"], v * info["scale"] ** 2)
        if op == "cat":
            return mo.concatenate(parts)
        if op == "repeat":
            return mo.repeat_features(parts[0], info["repeats"])
        if op == "dropout":
            return mo.dropout(parts[0], info["p"]) if ctx.training else parts[0]
        if op == "pool":
            return _pool_moments(info, parts[0], ctx.raw)
        raise AssertionError(op)

    def evaluate(self, ctx: Context, reader: str) -> Moments:
        key = id(self)
        if key not in ctx.memo and self._is_max_after_monotone(ctx):
            # max_K f(z) = f(max_K z) for a non-decreasing f: the maximum's Gaussian
            # approximation applies to the Gaussian pre-activation z, not to f(z) (a ReLU's output
            # has a point mass at 0).
            (act,) = self.children
            z = act.children[0].evaluate(ctx, reader)
            pooled = mo.max_pool(z, self.info["taps"], self.info["max_constants"])
            ctx.memo[key] = _activation(act.info, pooled)
        return super().evaluate(ctx, reader)

    def _is_max_after_monotone(self, ctx: Context) -> bool:
        if ctx.raw or self.op != "pool" or self.info["kind"] != "max":
            return False
        (child,) = self.children
        return (
            isinstance(child, Operation)
            and child.op == "activation"
            and child.info["kind"] in MONOTONE_ACTIVATIONS
            and child.info.get("slope", 0.0) >= 0.0
        )


def convolved_weight(module: nn.Module, detach: bool = False) -> Tensor:
    """The weight a convolution or linear layer applies: ``module.weight``, or what the layer's
    ``convolved_weight()`` returns where it transforms its weight in the forward (MABN's
    centred convolutions); ``detach``: as a constant (a prior's ``detach_prior_weights``)."""
    transformed = getattr(module, "convolved_weight", None)
    weight = module.weight if transformed is None else transformed()
    return weight.detach() if detach else weight


def _conv_moments(
    module: nn.Module, geometry: mo.TapGeometry, x: Moments, detach_weight: bool = False
) -> Moments:
    weight = convolved_weight(module, detach_weight).to(x.mean.dtype)
    bias = None if module.bias is None else module.bias.to(x.mean.dtype)
    if isinstance(module, nn.Linear):
        return mo.convolution(x, weight.unsqueeze(-1), bias, 1, geometry)
    return mo.convolution(x, weight, bias, module.groups, geometry)


def _conv_padding(module: ConvNd) -> tuple[int, ...]:
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    if module.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
    return tuple(module.padding)


def _activation(info: dict, x: Moments) -> Moments:
    return mo.activation(
        info["kind"], x, info.get("slope", 0.0), info.get("quadrature", mo.HERMITE)
    )


def _to(value: object, device: torch.device, dtype: torch.dtype) -> object:
    """``value``'s tensors (a tensor, or a tuple or named tuple holding some) on ``device`` in
    ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype)
    moved = [_to(v, device, dtype) if isinstance(v, torch.Tensor) else v for v in value]
    return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)


def place_constants(program: Node, device: torch.device, dtype: torch.dtype) -> None:
    """Every operation of ``program`` with its constants on ``device`` in ``dtype``
    (:meth:`Operation.place`)."""
    seen: set[int] = set()
    pending = [program]
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Operation):
            node.place(device, dtype)
        pending.extend(node.children)


def _constants(op: str, info: dict) -> dict:
    """The constants an operation needs, computed once when the program is built (the
    evaluation, which may be compiled, only reads them): the tap geometries with the zero
    border and without, a max pool's moments, a smooth activation's quadrature."""
    if op == "activation" and info["kind"] not in mo.CLOSED_FORM_ACTIVATIONS:
        return {"quadrature": mo.HERMITE}
    if op == "conv":
        module = info["module"]
        if isinstance(module, nn.Linear):
            full = mo.full_geometry(1)
            return {"geometry": full, "raw_geometry": full}
        full = mo.full_geometry(math.prod(module.kernel_size))
        if module.padding_mode != "zeros":
            return {"geometry": full, "raw_geometry": full}
        geometry = mo.tap_geometry(info["sizes"], module.kernel_size, module.stride,
                                   _conv_padding(module), module.dilation)  # fmt: skip
        return {"geometry": geometry, "raw_geometry": full}
    if op == "pool" and info["kind"] == "max":
        return {"max_constants": mo.max_constants(info["taps"])}
    if op == "pool" and info["kind"] == "avg":
        full = mo.full_geometry(info["taps"])
        geometry = mo.tap_geometry(info["sizes"], info["kernel"], info["stride"], info["padding"],
                                   (1,) * len(info["sizes"]))  # fmt: skip
        return {"geometry": geometry, "raw_geometry": full}
    return {}


def _pool_moments(info: dict, x: Moments, raw: bool) -> Moments:
    if info["kind"] == "max":
        return mo.max_pool(x, info["taps"], info["max_constants"])
    geometry = info["raw_geometry"] if raw else info["geometry"]
    return mo.average_pool(x, geometry, info["include_padding"])


class UnmodelledError(Exception):
    """A layer's input depends on an operation (or tensor) the moments cannot follow."""


def compile_programs(traced: Trace) -> tuple[list[Node | None], list[str | None]]:
    """One moment program per Kalman layer (``None`` where none exists) and, for each layer
    without one, the reason (``None`` for a layer whose input no Kalman layer produced: the
    first layers of a network, which are BatchNorm by design)."""
    compiled: dict[tuple[str, int, int], Node] = {}
    below: dict[int, list[int]] = {}

    def consumers(record: TensorRecord) -> list[int]:
        """Sorted chain positions of the Kalman layers that take a tensor of this subtree."""
        key = id(record)
        if key not in below:
            found = set(record.consumed_by)
            for r in record.inputs:
                found.update(consumers(r))
            below[key] = sorted(found)
        return below[key]

    def build(record: TensorRecord, reader: int, root: bool = False) -> Node:
        earlier = [j for j in record.consumed_by if j < reader]
        if not root and earlier:
            key = ("input", id(record), earlier[0])
            if key not in compiled:
                compiled[key] = LayerInput(earlier[0])
            return compiled[key]
        if record.op == "kalman":
            key = ("output", id(record), 0)
            if key not in compiled:
                index = record.info["index"]
                compiled[key] = LayerOutput(index, traced.layers[index])
            return compiled[key]
        if record.op == "input":
            raise _NoProducerError(record.info.get("reason", "input"))
        if record.op == "unmodelled":
            raise UnmodelledError(record.info["reason"])
        # Which tensors of the subtree are replaced by an earlier layer's input statistics
        # depends on the reader only through how many of the subtree's consumers precede it:
        # readers that agree on that share the node (and, in a pass, its evaluation).
        preceding = bisect.bisect_left(consumers(record), reader)
        key = ("operation" if not root else "root", id(record), preceding)
        if key not in compiled:
            children = [build(r, reader) for r in record.inputs]
            info = {**record.info, **_constants(record.op, record.info)}
            compiled[key] = Operation(record.op, children, info)
        return compiled[key]

    programs: list[Node | None] = []
    reasons: list[str | None] = []
    for index, record in enumerate(traced.inputs):
        try:
            program = build(record, index, root=True)
        except UnmodelledError as error:
            programs.append(None)
            reasons.append(str(error))
            continue
        except _NoProducerError:
            programs.append(None)
            reasons.append(None)
            continue
        programs.append(program if program.producers() else None)
        reasons.append(None)
    return programs, reasons


class _NoProducerError(Exception):
    """The tensor comes from the model's input without passing a Kalman layer."""
