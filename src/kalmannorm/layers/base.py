"""What every Kalman normalization layer shares: its learned prior, its gain and its chain link.

A Kalman layer estimates statistics of ``stat_width`` units (channels for BKN, channel groups for
GKN) per statistics group. It takes the posterior of its upstream layer in the chain, predicts a
prior from it, fuses the prior with its own batch statistics through the gain q (Eq. 5), and hands
its posterior on. Two ways to predict the prior:

``prior="learned"`` (the paper)
    mu^{k|k-1} = A mu^{k-1|k-1}, sigma^2_{k|k-1} = (A o A) sigma^2_{k-1|k-1} + R, with the
    transition A (``transition``, C_k x C_{k-1}), the noise R = softplus(``noise_raw``) >= 0 and the
    gain q = sigmoid(``gain_logit``) in (0, 1) learned by the task loss.

``prior="propagate"`` (the authors' public code)
    The upstream posterior moments are pushed through ReLU and the convolution/linear layer that
    feeds this norm, analytically (:func:`kalmannorm.functional.relu_moments` and
    :func:`~kalmannorm.functional.linear_moments`), with a fixed gain (q = 0.1, i.e. weight
    p = 0.9 on the prior) and the authors' guard: a statistics group whose mean prior/batch
    variance ratio reaches ``guard`` (100) uses its batch statistics alone. The authors sample a
    Gaussian map and convolve it; the analytic moments are what that sample estimates, without its
    noise and at a fraction of the cost. Unlike their code, statistics groups never mix channels
    and moving averages use every group.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as torch_f

from kalmannorm import functional as kf
from kalmannorm.chain import Posterior, check_recomputation, recomputing
from kalmannorm.compiled_step import compiled_call, runs_compiled
from kalmannorm.dataflow import convolved_weight
from kalmannorm.fused import (
    AfterStep,
    CompiledStep,
    FusedGroupNorm,
    KalmanStep,
    Layout,
    SmallStep,
    detached_leaf,
    variance_guard,
)

if TYPE_CHECKING:
    from kalmannorm.chain import KalmanChain

#: Initial gain q of a learned prior. Chosen by experiment: docs/design/init-sweep.md.
DEFAULT_GAIN = 0.9
#: Initial process noise R, in the units of the activations. The paper's u^k has unit variance,
#: but R = 1 dwarfs the batch variance of freshly initialised layers; 0.1 trained best and keeps
#: the initial normalising variance within about 10% of BatchNorm's (docs/design/init-sweep.md).
DEFAULT_NOISE = 0.1
#: Fixed gain of the authors' variant: p = 0.9 on the prior.
PROPAGATE_GAIN = 0.1
#: The authors' guard on mean(prior_var / batch_var).
PROPAGATE_GUARD = 100.0

PRIORS = ("learned", "propagate")
_KALMAN_KEYS = ("gain_logit", "gain_value", "noise_raw", "transition")
#: The state-dict version a Kalman layer writes (``_version``, in the checkpoint's metadata as
#: torch's ``_NormBase`` does). Every norm a Kalman layer replaces writes a smaller one (torch's
#: BatchNorm 2, GroupNorm and torchvision's FrozenBatchNorm2d 1, detectron2's FrozenBatchNorm2d
#: 3): a layer's entry of at least this version is a Kalman checkpoint, whose missing Kalman keys
#: are missing keys; a smaller or absent version is a plain norm's, whose Kalman keys are filled.
KALMAN_STATE_VERSION = 10


class KalmanEstimate(NamedTuple):
    """Result of one Kalman step, with graph: posterior mean/var (or cov), applied gain, prior
    (its variance as the update used it) and the predicted prior variance before any
    calibration (``calibrate_prior``)."""

    mean: Tensor
    var: Tensor
    gain: Tensor
    prior_mean: Tensor | None
    prior_var: Tensor | None
    predicted_var: Tensor | None = None


class KalmanStatistics(NamedTuple):
    """Statistics of a layer's last batch-statistics forward, detached. Shapes (G, width).

    ``prior_*`` are ``None`` for a layer without upstream; ``gain`` is the gain actually applied
    (1 where the guard rejected the prior). Variances are the diagonals of full covariances.
    """

    batch_mean: Tensor
    batch_var: Tensor
    prior_mean: Tensor | None
    prior_var: Tensor | None
    posterior_mean: Tensor
    posterior_var: Tensor
    gain: Tensor


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class KalmanNormBase(nn.Module):
    """Mixin holding the Kalman prior, the gain and the chain link; subclasses call
    :meth:`_init_kalman` from their ``__init__``; ``forward`` runs :meth:`upstream_posterior`,
    :meth:`estimate` and :meth:`record`.
    """

    _version = KALMAN_STATE_VERSION
    stat_width: int
    chain: KalmanChain | None
    tracing: bool
    #: Statistics per channel (BKN), which a data-flow chain can predict; GKN's are per sample
    #: and channel group.
    per_channel_statistics: bool = False
    #: Run the small step compiled in eager mode (:func:`kalmannorm.compile_kalman_steps`).
    compile_step: bool = False
    #: The prior reads the feeding convolutions' weights as constants (BKN's option).
    detach_prior_weights: bool = False

    def _init_kalman(
        self,
        stat_width: int,
        *,
        prior: str,
        gain: float | None,
        learn_gain: bool | None,
        noise: float,
        guard: float | None,
        covariance: str,
        check_finite: bool,
        factory_kwargs: dict,
    ) -> None:
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
        if prior == "propagate" and covariance == "full":
            raise ValueError("prior='propagate' tracks variances only: use covariance='diag'")
        propagate = prior == "propagate"
        gain = (PROPAGATE_GAIN if propagate else DEFAULT_GAIN) if gain is None else gain
        learn_gain = (not propagate) if learn_gain is None else learn_gain
        if not 0.0 <= gain <= 1.0:
            raise ValueError(f"gain q must lie in [0, 1], got {gain}")
        if learn_gain and not 0.0 < gain < 1.0:
            raise ValueError(
                f"a learned gain is sigmoid-parametrised and must start inside (0, 1), got {gain}; "
                f"pass learn_gain=False to fix it at {gain}"
            )
        if noise <= 0:
            raise ValueError(f"noise R must be positive, got {noise}")
        self.stat_width = stat_width
        self.prior = prior
        self.covariance = covariance
        self.initial_gain = gain
        self.learn_gain = learn_gain
        self.initial_noise = noise
        self.guard = (PROPAGATE_GUARD if propagate else None) if guard is None else guard
        self.check_finite = check_finite
        self.tracing = False
        self.chain = None
        self.chain_index = -1
        self.chain_name = ""
        self.last_statistics: KalmanStatistics | None = None
        self._replay_upstream: Posterior | None = None
        self._factory_kwargs = factory_kwargs
        self._drop_kalman_parameters()

    def _drop_kalman_parameters(self) -> None:
        """A layer without upstream is plain BatchNorm/GroupNorm and holds no Kalman parameters
        (so no parameter goes unused, which distributed data parallel would reject)."""
        self.register_parameter("gain_logit", None)
        self.register_buffer("gain_value", None)
        self.register_parameter("noise_raw", None)
        self.register_parameter("transition", None)

    def _create_kalman_parameters(self, upstream_width: int | None) -> None:
        """Gain q, noise R and transition A for a layer with an upstream: A is C_k x C_{k-1},
        zeros (execution flow, the paper), or a diagonal a (C_k,), ones, scaling the data-flow
        prediction of this layer's own input (``upstream_width=None``)."""
        kwargs = self._factory_kwargs
        if self.weight is not None:
            kwargs = {"device": self.weight.device, "dtype": self.weight.dtype}
        shape = (self.stat_width,)
        if self.learn_gain:
            self.gain_logit = nn.Parameter(torch.full(shape, _logit(self.initial_gain), **kwargs))
        else:
            self.register_buffer("gain_value", torch.full(shape, self.initial_gain, **kwargs))
        if self.prior == "learned":
            self.noise_raw = nn.Parameter(
                torch.full(shape, _softplus_inverse(self.initial_noise), **kwargs)
            )
            if upstream_width is None:
                self.transition = nn.Parameter(torch.ones(self.stat_width, **kwargs))
            else:
                self.transition = nn.Parameter(
                    torch.zeros(self.stat_width, upstream_width, **kwargs)
                )

    # -- parameters in their constrained form -------------------------------------------------

    @property
    def gain(self) -> Tensor:
        """The gain q^k in [0, 1], per unit (``None`` without upstream)."""
        if self.gain_logit is not None:
            return torch.sigmoid(self.gain_logit)
        return self.gain_value

    @property
    def noise(self) -> Tensor | None:
        """The process noise R >= 0 (diagonal), per unit; ``None`` for the propagated prior."""
        return None if self.noise_raw is None else torch_f.softplus(self.noise_raw)

    @property
    def display_name(self) -> str:
        return (
            f"{type(self).__name__} '{self.chain_name}'" if self.chain_name else type(self).__name__
        )

    # -- chain membership ---------------------------------------------------------------------

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> KalmanNormBase:
        """``nn.Module._apply`` (``.to()``, ``.cuda()``, ``.double()``, ``.to_empty()``, ...),
        then the constants of this layer's prior follow the layer (as torch's RNNs re-flatten
        their weights there)."""
        super()._apply(fn, recurse)
        self._place_prior_constants()
        return self

    def _place_prior_constants(self) -> None:
        """The constant tensors of this layer's data-flow program (tap geometries, quadrature
        nodes) on this layer's device, in its statistics' dtype (float64 for a float64 layer,
        else float32): an evaluation then converts none of them."""
        chain = getattr(self, "chain", None)
        own = [*self.parameters(recurse=False), *self.buffers(recurse=False)]
        floating = [t for t in own if t.is_floating_point()]
        if chain is None or not floating:
            return
        dtype = torch.float64 if floating[0].dtype == torch.float64 else torch.float32
        chain.place_constants(self.chain_index, floating[0].device, dtype)

    def join_chain(self, chain: KalmanChain, index: int, name: str) -> None:
        """Become layer ``index`` of ``chain``, with Kalman parameters sized to its upstream.

        Relinking keeps the learned parameters when their shapes are unchanged.
        """
        self.chain, self.chain_index, self.chain_name = chain, index, name
        self._place_prior_constants()
        if not chain.has_upstream(index) or self.is_batch_only():
            self._drop_kalman_parameters()
            return
        if chain.flow == "execution":
            width = chain.layers[index - 1].stat_width
            if self.prior == "propagate":
                self._check_propagation(chain, index)
        else:
            width = None  # a data-flow prior is in this layer's own channels
        if self.prior == "propagate":
            keeps = True
        elif width is None:
            keeps = self.transition is not None and self.transition.dim() == 1
        else:
            keeps = (
                self.transition is not None
                and self.transition.dim() == 2
                and self.transition.shape[1] == width
            )
        if self.gain is None or not keeps:
            self._create_kalman_parameters(width)

    def is_batch_only(self) -> bool:
        """A fixed gain q = 1 ignores any prior: the layer is plain BatchNorm/GroupNorm."""
        return not self.learn_gain and self.initial_gain == 1.0

    def leave_chain(self) -> None:
        self.chain, self.chain_index, self.chain_name = None, -1, ""
        self._drop_kalman_parameters()

    def _check_propagation(self, chain: KalmanChain, index: int) -> None:
        if self._propagation_source() is None:
            feeding = chain.preceding[index]
            fed = getattr(feeding, "in_channels", getattr(feeding, "in_features", None))
            warnings.warn(
                f"{self.display_name}: prior='propagate' needs the convolution/linear layer that "
                f"feeds it to take the upstream layer's {chain.layers[index - 1].stat_width} "
                f"channels (found {type(feeding).__name__ if feeding is not None else 'none'} "
                f"with {fed} inputs); this layer uses its batch statistics alone.",
                stacklevel=3,
            )

    def _propagation_source(self) -> nn.Module | None:
        """The convolution/linear layer feeding this one, if it takes the upstream's channels."""
        if self.chain is None or self.chain_index <= 0 or self.chain.flow != "execution":
            return None
        feeding = self.chain.preceding[self.chain_index]
        width = self.chain.layers[self.chain_index - 1].stat_width
        fed = getattr(feeding, "in_channels", getattr(feeding, "in_features", None))
        return feeding if fed == width else None

    # -- the Kalman step ----------------------------------------------------------------------
    # One step is: upstream_posterior() (order check), estimate() (pure math on (G, width)
    # tensors, whose autograd graph the fused backward differentiates), then record()
    # (hand-over, diagnostics).

    def upstream_posterior(self) -> Posterior | None:
        """This pass's posterior of the upstream layer (``None`` without one); checks the order.

        A recomputation by activation checkpointing gets, detached, the posterior this layer took
        in its last forward pass: the hand-over of that pass is over, and the recomputation only
        recreates the tensors the original graph saved.
        """
        if self.chain is None:
            return None
        if recomputing():
            if self.chain_index > 0:
                check_recomputation(self.display_name)
            return self._replay_upstream
        upstream = self.chain.upstream(self.chain_index)
        if upstream is not None and not torch.compiler.is_compiling():
            self._replay_upstream = Posterior(*(detached_leaf(t) for t in upstream))
        return upstream

    def estimate_inputs(self, upstream: Posterior | None) -> tuple[Tensor | None, ...]:
        """The small tensors :meth:`estimate` depends on besides the batch statistics:
        (upstream mean, upstream var, gain parameter, *prior parameters)."""
        if upstream is None or self.gain is None:
            return ()
        gain = self.gain_logit if self.gain_logit is not None else self.gain_value
        if self.chain.flow != "execution":
            if self.prior == "propagate":
                return (upstream.mean, upstream.var, gain)
            return (upstream.mean, upstream.var, gain, self.transition, self.noise_raw)
        if self.prior == "propagate":
            feeding = self._propagation_source()
            if feeding is None:
                return ()
            weight = convolved_weight(feeding, self.detach_prior_weights)
            return (upstream.mean, upstream.var, gain, weight, feeding.bias)
        return (upstream.mean, upstream.var, gain, self.transition, self.noise_raw)

    def estimate(
        self, batch_mean: Tensor, batch_second: Tensor, *inputs: Tensor | None
    ) -> KalmanEstimate:
        """Eq. (5): posterior from the batch statistics and :meth:`estimate_inputs`' tensors.

        ``batch_second`` is the variance (G, W) or, for ``covariance="full"``, the covariance
        (G, W, W). Without inputs (no upstream) the posterior is the batch statistics (q = 1).
        With ``compile_step`` (:func:`kalmannorm.compile_kalman_steps`) it runs compiled.
        """
        if self._compiles(inputs):
            return compiled_call(
                self, "estimate", self._estimate, batch_mean, batch_second, *inputs,
                what=f"the estimate of {self.display_name}",
            )  # fmt: skip
        return self._estimate(batch_mean, batch_second, *inputs)

    @property
    def estimate_reads_updated_state(self) -> bool:
        """Whether :meth:`_estimate` reads state the forward updates before the backward (a
        calibration's averages): its small step is then not compiled, whose backward would
        recompute the estimate from the updated state."""
        return False

    def _compiles(self, inputs: tuple[Tensor | None, ...]) -> bool:
        """Whether this step runs compiled: a prior to fuse, ``compile_step`` on, eager code."""
        return bool(inputs) and self.compile_step and runs_compiled()

    def _estimate(
        self, batch_mean: Tensor, batch_second: Tensor, *inputs: Tensor | None
    ) -> KalmanEstimate:
        """:meth:`estimate` as written."""
        if not inputs:
            return KalmanEstimate(batch_mean, batch_second, torch.ones_like(batch_mean), None, None)
        up_mean, up_var, gain_param, *prior_params = inputs
        prior_mean, prior_var, predicted_var = self._prior(
            batch_mean.shape[0], up_mean, up_var, *prior_params
        )
        gain = self._gain(gain_param).to(batch_mean.dtype).expand_as(batch_mean)
        if self.guard is not None:
            prior_diag, batch_diag = (_diagonal(v, batch_mean) for v in (prior_var, batch_second))
            gain, _ = kf.guard_gain(gain, prior_diag, batch_diag, self.guard)
        update = kf.kalman_update_full if self.covariance == "full" else kf.kalman_update
        mean, var = update(batch_mean, batch_second, prior_mean, prior_var, gain)
        prior_mean = prior_mean.expand_as(batch_mean)
        return KalmanEstimate(mean, var, gain, prior_mean, prior_var, predicted_var)

    def _prior(
        self, groups: int, up_mean: Tensor, up_var: Tensor, *prior_params: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The prior mu^{k|k-1}, sigma^2_{k|k-1} (or Sigma^{k|k-1}) of ``groups`` statistics
        groups from :meth:`estimate_inputs`' upstream statistics and prior parameters: its
        variance as the update uses it (calibrated) and as predicted."""
        if up_mean.shape[0] not in (1, groups):
            raise ValueError(
                f"{self.display_name} has {groups} statistics groups but the layers "
                f"that feed it had {up_mean.shape[0]}: layers linked in a chain must see the "
                f"same batch split into the same statistics groups."
            )
        if self.chain.flow != "execution":
            prior_mean, prior_var = kf.predict_data_flow_prior(up_mean, up_var, *prior_params)
            if self.covariance == "full":
                prior_var = torch.diag_embed(prior_var)
        elif self.prior == "propagate":
            first, second = prior_params
            if up_var.dim() == up_mean.dim() + 1:
                up_var = up_var.diagonal(dim1=-2, dim2=-1)
            relu_mean, relu_var = kf.relu_moments(up_mean, up_var)
            groups = getattr(self._propagation_source(), "groups", 1)
            prior_mean, prior_var = kf.linear_moments(relu_mean, relu_var, first, second, groups)
        elif self.covariance == "full":
            first, second = prior_params
            prior_mean, prior_var = kf.predict_prior_full(
                up_mean, up_var, first, torch_f.softplus(second)
            )
        else:
            first, second = prior_params
            prior_mean, prior_var = kf.predict_prior(
                up_mean, up_var, first, torch_f.softplus(second)
            )
        predicted_var = prior_var
        if self.covariance == "diag":
            prior_var = self.calibrated_prior_var(prior_var)
        return prior_mean, prior_var, predicted_var

    def _gain(self, gain_param: Tensor) -> Tensor:
        """q from its parameter (sigmoid of ``gain_logit``) or buffer (``gain_value``)."""
        return torch.sigmoid(gain_param) if self.gain_logit is not None else gain_param

    def calibrated_prior_var(self, prior_var: Tensor) -> Tensor:
        """The prior variance the update uses; a layer with a calibration overrides this."""
        return prior_var

    def fused_step(
        self,
        x: Tensor,
        layout: Layout,
        count: int,
        inputs: tuple[Tensor | None, ...],
        after: AfterStep | None = None,
    ) -> tuple[Tensor, KalmanEstimate, Tensor]:
        """One Kalman step (diagonal covariances) through :class:`kalmannorm.fused.FusedGroupNorm`
        (one autograd node; its small step :class:`kalmannorm.fused.KalmanStep`, or compiled with
        ``compile_step``): check, estimate, normalise, ``after`` (inside the small step: the
        moving averages) and :meth:`record`. Returns y, the estimate whose posterior is the
        node's differentiable output, and the batch variance (detached)."""

        def inspect(total: Tensor, total_square: Tensor) -> None:
            self.check_statistics(total, total_square, count)  # finite sums: finite statistics

        # the compiled backward recomputes the estimate: only from its inputs alone
        if self._compiles(inputs) and not self.estimate_reads_updated_state:
            estimate = functools.partial(self._affine_estimate, layout)
            what = f"the estimate of {self.display_name}"
            step: SmallStep = CompiledStep(self, estimate, layout, what, after)
        else:
            step, inputs = self._written_step(layout, layout.rows(x), inputs, after)
        y, mean, var, batch_mean, batch_var = FusedGroupNorm.apply(
            x, layout, variance_guard(self), step, inspect, self.weight, self.bias, *inputs
        )
        result = KalmanEstimate(mean, var, *step.extra)
        self.record(batch_mean, batch_var, result)
        return y, result, batch_var

    def _written_step(
        self,
        layout: Layout,
        rows: int,
        inputs: tuple[Tensor | None, ...],
        after: AfterStep | None,
    ) -> tuple[KalmanStep, tuple[Tensor, ...]]:
        """The :class:`kalmannorm.fused.KalmanStep` of this layer and its inputs: the prior
        (mu^{k|k-1}, sigma^2_{k|k-1}, q) of the estimate's ``rows``, predicted here by ordinary
        autograd (none without upstream)."""
        if not inputs:
            return KalmanStep(layout, self.eps, None, after, None), ()
        up_mean, up_var, gain_param, *prior_params = inputs
        prior_mean, prior_var, predicted_var = self._prior(rows, up_mean, up_var, *prior_params)
        step = KalmanStep(layout, self.eps, self.guard, after, _detached(predicted_var))
        return step, (prior_mean, prior_var, self._gain(gain_param))

    def _affine_estimate(
        self,
        layout: Layout,
        batch_mean: Tensor,
        batch_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        *inputs: Tensor | None,
    ) -> tuple[Tensor | None, ...]:
        """:meth:`_estimate`, then scale = gamma / sqrt(var + eps), shift = beta - mean scale:
        (mean, var, scale, shift, and the rest of the :class:`KalmanEstimate`)."""
        result = self._estimate(batch_mean, batch_var, *inputs)
        scale, shift = layout.affine(result.mean, result.var, weight, bias, self.eps)
        return result.mean, result.var, scale, shift, *result[2:]

    def record(self, batch_mean: Tensor, batch_second: Tensor, estimate: KalmanEstimate) -> None:
        """Hand the posterior to the next layer and keep detached diagnostics (neither when
        activation checkpointing recomputes the pass: it checks that it recomputes the last)."""
        if recomputing():
            self._check_replay(batch_mean)
            return
        if self.chain is not None:
            self.chain.publish(
                self.chain_index,
                Posterior(estimate.mean, estimate.var),
                batch_mean,
                _diagonal(batch_second, batch_mean),
            )
        prior_var = estimate.prior_var
        self.last_statistics = KalmanStatistics(
            batch_mean=_detached(batch_mean),
            batch_var=_detached(_diagonal(batch_second, batch_mean)),
            prior_mean=_detached(estimate.prior_mean),
            prior_var=None if prior_var is None else _detached(_diagonal(prior_var, batch_mean)),
            posterior_mean=_detached(estimate.mean),
            posterior_var=_detached(_diagonal(estimate.var, batch_mean)),
            gain=_detached(estimate.gain),
        )

    def _check_replay(self, batch_mean: Tensor) -> None:
        """A recomputation must see the batch of the layer's last forward pass."""
        last = self.last_statistics
        if (
            last is None
            or last.batch_mean.shape != batch_mean.shape
            or not torch.allclose(batch_mean.detach(), last.batch_mean, rtol=1e-4, atol=1e-6)
        ):
            raise RuntimeError(
                f"{self.display_name}: activation checkpointing recomputed a forward pass other "
                f"than this layer's last one, but a recomputation can only replay the statistics "
                f"handed over in the last pass. Run backward after each forward pass (accumulate "
                f"gradients over micro-batches with one backward per forward)."
            )

    def publish_fixed(self, mean: Tensor, var: Tensor) -> None:
        """Hand fixed (moving) statistics on to the next layer, without an order check."""
        if self.chain is not None:
            fixed = Posterior(mean.unsqueeze(0), var.unsqueeze(0))
            self.chain.publish(self.chain_index, fixed, *fixed)

    def check_statistics(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Reject statistics groups of one value and, with ``check_finite`` (one host sync),
        non-finite inputs with a clear message."""
        if count < 2:
            raise ValueError(
                f"{self.display_name}: each statistics group holds a single value per channel, so "
                f"its variance is undefined. Use a larger stat_batch_size (or batch), inputs with "
                f"spatial extent, or a per-sample norm such as GroupKalmanNorm."
            )
        if not self.check_finite or torch.compiler.is_compiling():
            return
        if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
            raise FloatingPointError(
                f"{self.display_name}: the input contains NaN or Inf (its batch statistics are "
                f"not finite). The activations diverged upstream: lower the learning rate, "
                f"check the loss scaling and the data; check_finite=False skips this check."
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version")
        if version is not None and version >= KALMAN_STATE_VERSION:
            if self._links_lazily():
                self._adopt_kalman_keys(state_dict, prefix)
        else:
            # A plain norm's checkpoint has no Kalman parameters: keep their initial values.
            for key in _KALMAN_KEYS:
                value = getattr(self, key)
                if value is not None and prefix + key not in state_dict:
                    state_dict[prefix + key] = value.detach()
            if not hasattr(self, "running_mean"):  # GKN: a BatchNorm's statistics are not used
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    state_dict.pop(prefix + key, None)
        transition = state_dict.get(prefix + "transition")
        if transition is not None and self.transition is None and self.prior == "learned":
            error_msgs.append(
                f"{self.display_name} ({prefix or 'root'}): the checkpoint holds a transition A of "
                f"shape {tuple(transition.shape)} but this layer is not linked to an upstream "
                f"layer. Convert and link the model (kalmannorm.convert_norm / link_chain) the "
                f"same way as the model that was saved, then load."
            )
            state_dict.pop(prefix + "transition")
        for name, value in list(self._parameters.items()) + list(self._buffers.items()):
            given = state_dict.get(prefix + name)
            if value is not None and isinstance(given, Tensor) and given.shape != value.shape:
                error_msgs.append(
                    f"{self.display_name} ({prefix or 'root'}): '{name}' has shape "
                    f"{tuple(value.shape)} here but {tuple(given.shape)} in the checkpoint. The "
                    f"checkpoint comes from a model with other channel counts or another chain: "
                    f"build the same architecture (and link it the same way) before loading."
                )
                state_dict.pop(prefix + name)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _links_lazily(self) -> bool:
        """Whether this layer's chain is still to be settled by a traced pass (a provisional
        chain, or none yet): its Kalman parameters are then whatever a checkpoint holds."""
        from kalmannorm.chain import _Pending

        chain = self.chain
        if chain is None:
            return True
        return bool(getattr(chain, "awaiting_trace", False)) or any(
            isinstance(program, _Pending) for program in chain.programs
        )

    def _adopt_kalman_keys(self, state_dict, prefix: str) -> None:
        """Take the Kalman parameters' set and shapes from a Kalman checkpoint (before its chain
        is traced, a layer cannot know them; the saved model's traced chain did)."""
        reference = self._reference_tensor()
        kwargs = {"device": reference.device, "dtype": reference.dtype}
        for key in _KALMAN_KEYS:
            given = state_dict.get(prefix + key)
            value = getattr(self, key)
            if not isinstance(given, Tensor):
                if value is not None:
                    setattr(self, key, None)
                continue
            if value is not None and value.shape == given.shape:
                continue
            fresh = torch.empty(given.shape, **kwargs)
            if key == "gain_value":
                self.register_buffer(key, fresh)
            else:
                self.register_parameter(key, nn.Parameter(fresh))

    def _reference_tensor(self) -> Tensor:
        """A tensor of the layer's device and dtype."""
        for name in ("weight", "running_var"):
            value = getattr(self, name, None)
            if isinstance(value, Tensor):
                return value
        return torch.empty(0, **{k: v for k, v in self._factory_kwargs.items() if v is not None})


def _detached(t: Tensor | None) -> Tensor | None:
    """``t`` without its graph (itself where it has none: a compiled step's diagnostics)."""
    return t.detach() if t is not None and t.requires_grad else t


def _diagonal(var: Tensor, like: Tensor) -> Tensor:
    """Variances from a diagonal (G, C) or full (G, C, C) second moment."""
    if var.dim() == like.dim() + 1:
        return var.diagonal(dim1=-2, dim2=-1)
    return var
