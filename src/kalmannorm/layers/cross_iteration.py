"""Cross-Iteration Batch Normalization (Yao et al., arXiv 2002.05712), with statistics groups.

CBN normalises with statistics averaged over the current and the k - 1 previous training
iterations. A past iteration's statistics were measured under that iteration's weights; they are
carried to the current weights theta_t by a first-order Taylor step through the weight of the
convolution (or linear layer) that produces the norm's input -- the paper truncates the gradient
at that layer, as the derivatives through earlier layers are small.

For statistics group g, channel c, and a past iteration tau recorded with weights (W', b'),
mean mu' and second moment nu' = E[z^2] of the norm's input z = conv(u; W') + b' (+ terms that do
not depend on W, b, such as a residual):

    dmu/dW_c  = E_g[patch(u)]                 the mean input patch (the same for every c in a
                                              convolution group: stored once per group)
    dnu/dW_c  = 2 E_g[z_c patch(u)]           one weight-gradient convolution for all groups
    dmu/db_c  = 1,  dnu/db_c = 2 mu'_c
    mu~  = mu' + <dmu/dW_c, W_c - W'_c> + (b_c - b'_c)
    nu~  = nu' + <dnu/dW_c, W_c - W'_c> + 2 mu'_c (b_c - b'_c)

(W, b the current weights, read without gradient; the compensated statistics are constants for
autograd, as in the paper). The mean is linear in W, so mu~ is exact; nu~ misses the second-order
term (W - W')^T E[patch patch^T] (W - W') >= 0. The derivatives are computed in closed form from
the convolution's input, captured by a forward hook, for all statistics groups in one grouped
weight-gradient convolution. Each record stores offsets (mu' - <dmu/dW, W'> - b' and
nu' - <dnu/dW, W'> - 2 mu' b') instead of a copy of W', so mu~ = offset + <dmu/dW, W> + b: one
weight-sized tensor per record and group.

Then, per group and channel, with the current batch's xbar_t, S_t (biased variance) and the
records whose compensated variance nu~ - mu~^2 is non-negative (the others are rejected for that
channel, as the authors' code does) -- n values in all, the current one included:

    mu_bar     = (xbar_t + sum mu~) / n
    sigma2_bar = (S_t + (xbar_t - mu_bar)^2 + sum [(nu~ - mu~^2) + (mu~ - mu_bar)^2]) / n
               = (1/n) sum nu - mu_bar^2                  (written without the cancellation)
    y = (x - mu_bar) / sqrt(sigma2_bar + eps) * gamma + beta

**Gradient.** The records are constants for autograd, so the gradient reaches the statistics
only through the current batch's, with weight 1/n: d mu_bar / d xbar_t = 1/n, and likewise for
its second moment. BatchNorm's backward projects the gradient off the directions of shifting and
scaling x (which normalisation cancels); CBN's keeps about (n - 1)/n of those components. With a
large statistics batch the window statistics are close to the batch's, but this backward still
differs from BatchNorm's; in short runs at a high learning rate it trains measurably slower than
BatchNorm (by the paper's definition and the authors' code, not an approximation error).

During the first ``burn_in`` training steps the layer is plain (ghost) BatchNorm and records
nothing; afterwards it records every step, so the window fills over the next k - 1 steps. With
``window_size=1`` it is BatchNorm. Moving averages (eval mode) follow the current batch, as in
the authors' code, with BatchNorm's convention (see :mod:`kalmannorm.layers.ghost_batch`).

**Statistics groups.** Each group of ``stat_batch_size`` samples is one emulated device: it keeps
its own window of records (its own past statistics and derivatives), so a group sees
``stat_batch_size * k`` samples, as k iterations of a real device with that micro-batch would.
The window therefore holds, per record, one weight-sized tensor per group. A batch that splits
into another number of groups than the window holds restarts the window (with a warning).

**The feeding convolution.** The layer needs the convolution/linear layer that produces its input:
``kalmannorm.convert_norm(model, "cbn")`` (or :func:`link_cross_iteration`) finds it as the
last convolution/linear layer with as many output channels that is registered (or, with
``example_input``, runs) before the norm and attaches it; ``attach_conv`` or the ``conv``
argument do so by hand. The reference is a plain attribute, not a submodule, so it appears
neither in ``modules()`` nor in the state_dict; ``copy.deepcopy`` and ``torch.save`` of the model
keep it pointing at the model's own convolution. A layer with ``window_size > 1`` and no feeding
convolution refuses to train, naming the fix.

Window buffers (``window_stats``, ``window_grad_mean``, ``window_grad_sq``, ``window_count``)
and the step counter ``cbn_step`` are in the state_dict, so a resumed run continues the burn-in and
the window; they live on the layer's device (no device is hard-coded). Not thread-safe: the window
is a sequence of training steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as torch_f

from kalmannorm import functional as kf
from kalmannorm._torch_private import ConvNd, NormBase
from kalmannorm.layers.affine import empty_output
from kalmannorm.layers.ghost_batch import (
    check_input,
    check_stat_batch_size,
    evaluates_with_batch,
    grouped_batch_norm,
    refuse_recomputation,
    update_running_stats,
)

#: Window size k (current iteration + k - 1 records): the official detection configs keep 3 past
#: iterations ("buffer3").
DEFAULT_WINDOW_SIZE = 4
#: Training steps of plain BatchNorm before the window is used.
DEFAULT_BURN_IN = 0

_WINDOW_KEYS = ("window_stats", "window_grad_mean", "window_grad_sq")
_STATE_KEYS = ("window_count", "cbn_step")


# -- derivatives of the statistics with respect to the feeding layer's weight ---------------------


def _explicit_padding(conv: ConvNd, u: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The convolution's input padded as its forward pads it, and the padding left to apply."""
    dims = len(conv.kernel_size)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = [(0, 0)] * dims
        else:  # "same": torch puts the odd element on the right
            totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in conv.padding]
    if conv.padding_mode == "zeros" and all(a == b for a, b in pads):
        return u, tuple(a for a, _ in pads)
    flat = [v for pair in reversed(pads) for v in pair]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return torch_f.pad(u, flat, mode=mode), (0,) * dims


def _weight_gradient(
    conv: ConvNd,
    u: Tensor,
    padding: Sequence[int],
    grad_output: Tensor,
    weight_shape: Sequence[int],
    groups: int,
) -> Tensor:
    """sum over samples and positions of grad_output * patch(u): a convolution's weight gradient
    (``torch.nn.grad.conv{1,2,3}d_weight``: one ``convolution_backward`` call)."""
    gradient = _WEIGHT_GRADIENTS[len(conv.kernel_size) - 1]
    return gradient(u, weight_shape, grad_output, conv.stride, padding, conv.dilation, groups)


_WEIGHT_GRADIENTS = (
    torch.nn.grad.conv1d_weight, torch.nn.grad.conv2d_weight, torch.nn.grad.conv3d_weight,
)  # fmt: skip


def moment_gradients(
    feeding: nn.Module, u: Tensor, z: Tensor, groups: int, count: int
) -> tuple[Tensor, Tensor]:
    """Derivatives of each statistics group's mean and second moment of z w.r.t. the weight.

    ``u`` is the feeding layer's input, ``z`` the norm's input (N, C, *spatial) with N = groups * s,
    ``count`` = m values per group and channel. Returns

    - ``grad_mean`` (G, gamma, C_in/gamma, K): dmu_{g,c}/dW_c = (1/m) sum patch(u), the same for
      every output channel c of convolution group h (gamma groups, K kernel taps);
    - ``grad_sq`` (G, C, C_in/gamma, K): dnu_{g,c}/dW_c = (2/m) sum z_c patch(u).

    Convolutions use one grouped weight-gradient convolution for all statistics groups (group g's
    samples as channel block g); linear layers, (N, C_in) inputs, a batched product.
    """
    if isinstance(feeding, nn.Linear):
        inputs = u.unflatten(0, (groups, -1))  # (G, s, C_in)
        outputs = z.unflatten(0, (groups, -1))  # (G, s, C)
        grad_mean = inputs.mean(1)[:, None, :, None]
        grad_sq = (2.0 / count) * torch.einsum("gso,gsi->goi", outputs, inputs)
        return grad_mean, grad_sq.unsqueeze(-1)
    conv_groups = feeding.groups
    c_in, c_out = feeding.in_channels, feeding.out_channels
    kernel = tuple(feeding.kernel_size)
    u, padding = _explicit_padding(feeding, u)
    spatial_in, spatial_out = u.shape[2:], z.shape[2:]
    per_group = u.shape[0] // groups
    # Samples of group g become channel block g of one sample-batch of s: (s, G * C, *spatial).
    u_blocks = (
        u.unflatten(0, (groups, per_group))
        .transpose(0, 1)
        .reshape(per_group, groups * c_in, *spatial_in)
    )
    z_blocks = (
        z.unflatten(0, (groups, per_group))
        .transpose(0, 1)
        .reshape(per_group, groups * c_out, *spatial_out)
    )
    grad_sq = _weight_gradient(
        feeding,
        u_blocks,
        padding,
        (2.0 / count) * z_blocks,
        (groups * c_out, c_in // conv_groups, *kernel),
        groups * conv_groups,
    ).reshape(groups, c_out, c_in // conv_groups, -1)
    # The mean's derivative: the patches of the group's summed input, one output per conv group.
    u_sum = u.unflatten(0, (groups, per_group)).sum(1).reshape(1, groups * c_in, *spatial_in)
    ones = u.new_full((1, groups * conv_groups, *spatial_out), 1.0 / count)
    grad_mean = _weight_gradient(
        feeding,
        u_sum,
        padding,
        ones,
        (groups * conv_groups, c_in // conv_groups, *kernel),
        groups * conv_groups,
    ).reshape(groups, conv_groups, c_in // conv_groups, -1)
    return grad_mean, grad_sq


def weight_products(grad_mean: Tensor, grad_sq: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel inner products <dmu/dW_c, W_c> and <dnu/dW_c, W_c>.

    ``grad_mean`` (..., G, gamma, J, K), ``grad_sq`` (..., G, C, J, K), ``weight`` (C, J, K)
    with J = C_in / gamma. Returns two (..., G, C) tensors.
    """
    conv_groups = grad_mean.shape[-3]
    c = weight.shape[0]
    blocks = weight.reshape(conv_groups, c // conv_groups, *weight.shape[1:])
    mean_part = torch.einsum("...hjk,hojk->...ho", grad_mean, blocks).flatten(-2)
    sq_part = torch.einsum("...cjk,cjk->...c", grad_sq, weight)
    return mean_part, sq_part


def combine_window(
    mean: Tensor, var: Tensor, past_mean: Tensor, past_sq: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Average the current statistics with the accepted compensated records, per group/channel.

    ``mean``, ``var`` (G, C): the current batch's mean and biased variance; ``past_mean``,
    ``past_sq`` (R, G, C): compensated mean mu~ and second moment nu~ of R records; ``valid``
    (R, G, C) bool: records that exist. A record is accepted where it exists and nu~ - mu~^2 >= 0.
    Returns (mu_bar, sigma2_bar, n) with n the number of values averaged (current included).
    """
    past_var = past_sq - past_mean.square()
    accepted = valid & (past_var >= 0)
    zero = torch.zeros((), dtype=mean.dtype, device=mean.device)
    count = 1 + accepted.sum(0).to(mean.dtype)
    mean_bar = (mean + torch.where(accepted, past_mean, zero).sum(0)) / count
    spread = torch.where(accepted, past_var + (past_mean - mean_bar).square(), zero).sum(0)
    var_bar = (var + (mean - mean_bar).square() + spread) / count
    return mean_bar, var_bar, count


class CrossIterationStatistics(NamedTuple):
    """Statistics of a CBN layer's last training forward, detached, (G, C) each.

    ``batch_mean``/``batch_var``: the current batch's; ``mean``/``var``: what it normalised with.
    """

    batch_mean: Tensor
    batch_var: Tensor
    mean: Tensor
    var: Tensor


def weight_layout(module: nn.Module) -> tuple[int, int, int]:
    """(C_out, C_in / groups, kernel taps) of a convolution/linear weight."""
    weight = module.weight
    return weight.shape[0], weight.shape[1], math.prod(weight.shape[2:])


def window_statistics(
    mean: Tensor, var: Tensor, past_mean: Tensor, past_sq: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """(mu_bar, sigma2_bar) of :func:`combine_window`, the estimate CBN normalises with."""
    mean_bar, var_bar, _ = combine_window(mean, var, past_mean, past_sq, valid)
    return mean_bar, var_bar


# -- the feeding layer's reference ------------------------------------------------------------


class FeedingLink:
    """Reference from a CBN layer to the layer that feeds it, and a forward hook on that layer.

    A plain object (not a module), so the feeding layer is not registered a second time. While
    its CBN layer trains with a window, the hook keeps the feeding layer's latest input and output
    shape until the CBN layer takes them. Deep copies and pickles of a model map ``module`` and
    ``owner`` to the copies; a captured input is never copied or saved.
    """

    def __init__(self, owner: CrossIterationBatchNorm, module: nn.Module, name: str) -> None:
        self.owner = owner
        self.module = module
        self.name = name
        self.input: Tensor | None = None
        self.output_shape: torch.Size | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        owner = self.owner
        if owner.training and owner.window_size > 1 and args and isinstance(args[0], Tensor):
            self.input = args[0]
            self.output_shape = output.shape

    def take(self) -> tuple[Tensor | None, torch.Size | None]:
        captured = self.input, self.output_shape
        self.input, self.output_shape = None, None
        return captured

    def remove(self) -> None:
        self.handle.remove()
        self.input, self.output_shape = None, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["input"], state["output_shape"] = None, None
        return state


# -- the layer --------------------------------------------------------------------------------


class CrossIterationBatchNorm(NormBase):
    """Cross-Iteration Batch Normalization over (N, C, *spatial); use the 1d/2d/3d classes.

    Args:
        num_features: channels C.
        eps, momentum, affine, track_running_stats: as in :class:`torch.nn.BatchNorm2d`.
        stat_batch_size: samples per statistics group (each group keeps its own window);
            ``None``: the whole batch is one group.
        window_size: k, iterations averaged (the current one and k - 1 records); 1 is BatchNorm.
        burn_in: training steps of plain BatchNorm before the window is used.
        conv: the convolution/linear layer that produces this layer's input (else attached by
            :func:`kalmannorm.convert_norm` / :func:`link_cross_iteration` / :meth:`attach_conv`).
    """

    _expected_dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        stat_batch_size: int | None = None,
        window_size: int = DEFAULT_WINDOW_SIZE,
        burn_in: int = DEFAULT_BURN_IN,
        conv: nn.Module | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        check_stat_batch_size(stat_batch_size)
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1 (1 is plain BatchNorm), got {window_size}")
        if burn_in < 0:
            raise ValueError(f"burn_in must be >= 0, got {burn_in}")
        self.stat_batch_size = stat_batch_size
        #: statistics used in eval mode (``set_eval_statistics``; "moving" by default, as
        #: BatchNorm: "auto" is measured only for BKN and ghost BN)
        self.eval_statistics = "moving"
        self.window_size = int(window_size)
        self.burn_in = int(burn_in)
        self.tracing = False
        self.layer_name = ""
        self.feeding: FeedingLink | None = None
        self.last_statistics: CrossIterationStatistics | None = None
        for key in _WINDOW_KEYS:
            self.register_buffer(key, torch.zeros(0, device=device, dtype=dtype))
        for key in _STATE_KEYS:
            self.register_buffer(key, torch.zeros((), dtype=torch.long, device=device))
        #: ``cbn_step`` mirrored on the host (read once after a checkpoint loads: no host sync
        #: per step)
        self._host_step: int | None = 0
        if conv is not None:
            self.attach_conv(conv)

    # -- the feeding layer --------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        name = type(self).__name__
        return f"{name} '{self.layer_name}'" if self.layer_name else name

    @property
    def conv(self) -> nn.Module | None:
        """The convolution/linear layer this layer compensates through, if attached."""
        return None if self.feeding is None else self.feeding.module

    def attach_conv(self, conv: nn.Module, name: str = "", conv_name: str = "") -> None:
        """Compensate through ``conv`` (a non-transposed convolution or a linear layer producing
        this layer's input). Attaching another layer than before clears the window."""
        if name:
            self.layer_name = name
        if isinstance(conv, ConvNd) and not conv.transposed:
            width = conv.out_channels
        elif isinstance(conv, nn.Linear):
            width = conv.out_features
        else:
            raise TypeError(
                f"{self.display_name}: the feeding layer must be a convolution (Conv1d/2d/3d) or "
                f"nn.Linear, got {type(conv).__name__}; CBN compensates its window through the "
                f"weight of such a layer."
            )
        if width != self.num_features:
            raise ValueError(
                f"{self.display_name} normalises {self.num_features} channels but "
                f"{type(conv).__name__} {conv_name!r} produces {width}: attach the layer whose "
                f"output this norm receives."
            )
        same = self.feeding is not None and self.feeding.module is conv
        if self.feeding is not None:
            self.feeding.remove()
        self.feeding = FeedingLink(self, conv, conv_name or type(conv).__name__)
        if not same:
            self.reset_window()

    def detach_conv(self) -> None:
        """Forget the feeding layer (and remove the hook on it)."""
        if self.feeding is not None:
            self.feeding.remove()
        self.feeding = None

    def reset_window(self) -> None:
        """Drop every record (the next steps refill the window)."""
        for key in _WINDOW_KEYS:
            setattr(self, key, getattr(self, key).new_zeros(0))
        self.window_count.zero_()

    # -- forward ------------------------------------------------------------------------------

    def _check_input_dim(self, x: Tensor) -> None:
        check_input(self, x, self._expected_dims, "CrossIterationBatchNorm")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, stat_batch_size={self.stat_batch_size}, "
            f"window_size={self.window_size}, burn_in={self.burn_in}"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        captured, produced = self.feeding.take() if self.feeding is not None else (None, None)
        if self.tracing:
            return x.clone()
        if x.shape[0] == 0:  # as torch's BatchNorm: an empty batch in, an empty batch out
            return empty_output(x, self.weight, self.bias)
        if not (self.training or not self.track_running_stats or evaluates_with_batch(self)):
            return kf.normalize(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
            )
        if not self.training:
            return grouped_batch_norm(self, x).output

        refuse_recomputation(self)
        groups = kf.num_stat_groups(x.shape[0], self.stat_batch_size)
        if self.window_size > 1:
            self._check_feeding(x, captured, produced)
        if getattr(self, "_host_step", None) is None:
            self._host_step = int(self.cbn_step)  # once after loading (one host read)
        self.cbn_step.add_(1)
        self._host_step += 1
        uses_window = self.window_size > 1 and self._host_step > self.burn_in
        if uses_window and self._window_matches(groups):
            dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            result = grouped_batch_norm(self, x, window_statistics, self._compensated(dtype))
        else:
            result = grouped_batch_norm(self, x)
        if self.track_running_stats:
            update_running_stats(self, result.batch_mean, result.batch_var, result.count)
        if uses_window:
            self._record(result.batch_mean, result.batch_var, captured, x.detach(), result.count)
        self.last_statistics = CrossIterationStatistics(
            result.batch_mean, result.batch_var, result.mean, result.var
        )
        return result.output

    def _check_feeding(
        self, x: Tensor, captured: Tensor | None, produced: torch.Size | None
    ) -> None:
        if self.feeding is None:
            raise RuntimeError(
                f"{self.display_name} has no feeding convolution: CBN compensates the statistics "
                f"of past iterations through the weight of the convolution/linear layer that "
                f"produces its input. Convert the model with kalmannorm.convert_norm(model, "
                f"'cbn') (which attaches it), call layer.attach_conv(conv), or use "
                f"window_size=1 (plain BatchNorm)."
            )
        if captured is None:
            raise RuntimeError(
                f"{self.display_name}: its feeding layer '{self.feeding.name}' did not run before "
                f"it in this training forward pass, so the statistics cannot be compensated. "
                f"Attach the layer that produces this norm's input (kalmannorm.link_cross_"
                f"iteration(model, example_input=x) traces it)."
            )
        if produced != x.shape:
            raise RuntimeError(
                f"{self.display_name}: its input has shape {tuple(x.shape)} but its feeding layer "
                f"'{self.feeding.name}' produced {tuple(produced)}; CBN needs the layer whose "
                f"output it normalises (something between them changes the shape). Attach the "
                f"right layer with attach_conv, or use another norm here."
            )

    # -- the window ---------------------------------------------------------------------------

    def _window_matches(self, groups: int) -> bool:
        """Whether the window holds records for ``groups`` statistics groups (restart if not)."""
        stats = self.window_stats
        if stats.numel() == 0:
            return False
        if stats.shape[2] != groups:
            warnings.warn(
                f"{self.display_name}: the batch splits into {groups} statistics groups but the "
                f"window holds records of {stats.shape[2]}; the window restarts. Keep the batch "
                f"size fixed (e.g. drop_last=True) to avoid this.",
                stacklevel=3,
            )
            self.reset_window()
            return False
        if tuple(self.window_grad_sq.shape[2:]) != weight_layout(self.feeding.module):
            self.reset_window()  # the feeding layer changed shape
            return False
        return True

    def _current_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """The feeding layer's weight as (C, C_in / groups, taps) and bias, without gradient."""
        module = self.feeding.module
        weight = module.weight.detach().to(dtype).reshape(weight_layout(module))
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        return weight, bias

    def _compensated(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """The records' compensated mean mu~ and second moment nu~ (R, G, C), and which exist."""
        weight, bias = self._current_weights(dtype)
        stats = self.window_stats.to(dtype)
        mean_part, sq_part = weight_products(
            self.window_grad_mean.to(dtype), self.window_grad_sq.to(dtype), weight
        )
        past_mean = stats[:, 0] + mean_part
        past_sq = stats[:, 1] + sq_part
        if bias is not None:
            past_mean = past_mean + bias
            past_sq = past_sq + 2.0 * stats[:, 2] * bias
        records = stats.shape[0]
        exists = torch.arange(records, device=stats.device) < self.window_count
        return past_mean, past_sq, exists.view(records, 1, 1).expand_as(past_mean)

    @torch.no_grad()
    def _record(self, mean: Tensor, var: Tensor, u: Tensor, z: Tensor, count: int) -> None:
        """Store this step's statistics and derivatives as offsets (module docstring)."""
        groups = mean.shape[0]
        dtype = mean.dtype
        grad_mean, grad_sq = moment_gradients(
            self.feeding.module, u.detach().to(dtype), z.to(dtype), groups, count
        )
        records = self.window_size - 1
        if self.window_stats.shape != (records, 3, groups, self.num_features):
            self.window_stats = mean.new_zeros(records, 3, groups, self.num_features)
            self.window_grad_mean = grad_mean.new_zeros(records, *grad_mean.shape)
            self.window_grad_sq = grad_sq.new_zeros(records, *grad_sq.shape)
            self.window_count.zero_()
        weight, bias = self._current_weights(dtype)
        mean_part, sq_part = weight_products(grad_mean, grad_sq, weight)
        mean_offset = mean - mean_part
        sq_offset = var + mean.square() - sq_part
        if bias is not None:
            mean_offset = mean_offset - bias
            sq_offset = sq_offset - 2.0 * mean * bias
        slot = torch.remainder(self.window_count, records).view(1)
        entry = torch.stack([mean_offset, sq_offset, mean]).to(self.window_stats.dtype)
        self.window_stats.index_copy_(0, slot, entry.unsqueeze(0))
        # (the window keeps its dtype when the model is cast after it filled: .half())
        self.window_grad_mean.index_copy_(0, slot, grad_mean.unsqueeze(0).to(entry.dtype))
        self.window_grad_sq.index_copy_(0, slot, grad_sq.unsqueeze(0).to(entry.dtype))
        self.window_count.add_(1)

    # -- checkpoints --------------------------------------------------------------------------

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        for key in _WINDOW_KEYS:
            given = state_dict.get(prefix + key)
            if given is None:  # a BatchNorm checkpoint: no window yet
                state_dict[prefix + key] = getattr(self, key).new_zeros(0)
                state_dict[prefix + "window_count"] = torch.zeros_like(self.window_count)
            elif isinstance(given, Tensor) and given.shape != getattr(self, key).shape:
                own = getattr(self, key)
                setattr(self, key, own.new_empty(given.shape))
        for key in _STATE_KEYS:
            if prefix + key not in state_dict:
                state_dict[prefix + key] = torch.zeros_like(getattr(self, key))
        self._host_step = None  # the loaded step count is read at the next training forward
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class CrossIterationBatchNorm1d(CrossIterationBatchNorm):
    """CBN over (N, C) or (N, C, L) inputs (after nn.Linear or nn.Conv1d).

    Arguments: as :class:`CrossIterationBatchNorm`.

    Shape:
        - Input: (N, C) or (N, C, L), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (2, 3)


class CrossIterationBatchNorm2d(CrossIterationBatchNorm):
    """CBN over (N, C, H, W) inputs (after nn.Conv2d).

    Arguments: as :class:`CrossIterationBatchNorm`.

    Shape:
        - Input: (N, C, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.

    Examples::

        >>> import torch
        >>> from kalmannorm.baselines import CrossIterationBatchNorm2d
        >>> conv = torch.nn.Conv2d(3, 16, 3)  # compensates past statistics through its weight
        >>> layer = CrossIterationBatchNorm2d(16, stat_batch_size=2, conv=conv)
        >>> layer(conv(torch.randn(8, 3, 7, 7))).shape
        torch.Size([8, 16, 5, 5])
    """

    _expected_dims = (4,)


class CrossIterationBatchNorm3d(CrossIterationBatchNorm):
    """CBN over (N, C, D, H, W) inputs (after nn.Conv3d).

    Arguments: as :class:`CrossIterationBatchNorm`.

    Shape:
        - Input: (N, C, D, H, W), N a multiple of ``stat_batch_size``.
        - Output: the input's shape.
    """

    _expected_dims = (5,)


def link_cross_iteration(root: nn.Module, example_input: object = None) -> int:
    """Attach to every CBN layer of ``root`` the convolution/linear layer that feeds it.

    The feeding layer is the last convolution/linear layer with as many output channels as the
    norm that is registered before it (or, with ``example_input``, runs before it in one traced
    forward pass; see :func:`kalmannorm.chain.find_feeding_layers`). A CBN layer with a window and
    no such layer is a ``ValueError`` naming it. Returns the number of layers linked.
    """
    from kalmannorm.chain import find_feeding_layers

    found, source = find_feeding_layers(
        root,
        lambda m: isinstance(m, CrossIterationBatchNorm),
        example_input,
        kind="CrossIterationBatchNorm layer",
    )
    names = {id(m): n for n, m in root.named_modules()}
    for entry in found:
        layer = entry.layer
        if entry.feeding is None:
            if layer.window_size == 1:
                layer.layer_name = entry.name
                continue
            where = "runs" if source == "traced" else "is registered"
            raise ValueError(
                f"{type(layer).__name__} '{entry.name}': no convolution/linear layer with "
                f"{layer.num_features} output channels {where} before it, and CBN compensates "
                f"the statistics of past iterations through the weight of the layer that "
                f"produces its input. If the model registers its modules in another order than "
                f"it runs them, pass example_input=x to trace the order; otherwise use another "
                f"norm for this model (e.g. 'bn' with stat_batch_size, or 'bkn')."
            )
        layer.attach_conv(entry.feeding, name=entry.name, conv_name=names[id(entry.feeding)])
    return len(found)


__all__ = [
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm1d",
    "CrossIterationBatchNorm2d",
    "CrossIterationBatchNorm3d",
    "CrossIterationStatistics",
    "FeedingLink",
    "combine_window",
    "link_cross_iteration",
    "moment_gradients",
    "weight_products",
    "window_statistics",
]
