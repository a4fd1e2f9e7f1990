"""Moving Average Batch Normalization against an independent float64 recomputation of its
definition (forward and backward over several iterations), gradcheck where the definition is an
ordinary function, checkpoints, conversion, folding and weight centring."""

import copy
import io
import pickle

import pytest
import torch
from conftest import conv_bn_stack
from torch import nn

import kalmannorm
from kalmannorm.layers.moving_average_batch import (
    CenteredConv2d,
    CenteredLinear,
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
    center_conv_weights,
    centered_weight,
)

DT = torch.float64


class Reference:
    """MABN step by step from the paper's equations, one statistics group at a time."""

    def __init__(self, channels, groups, window, warmup, renorm_start, r_max, momentum, eps):
        self.window, self.warmup, self.renorm_start = window, warmup, renorm_start
        self.r_max, self.momentum, self.eps = r_max, momentum, eps
        self.hist_sq = [[] for _ in range(groups)]
        self.hist_psi = [[] for _ in range(groups)]
        self.ema = torch.ones(channels, dtype=DT)  # running_var 1 + running_mean 0^2
        self.running_mean = torch.zeros(channels, dtype=DT)
        self.t = 0

    def _sma(self, current, history):
        if self.t <= self.warmup:
            return current
        past = history[-(self.window - 1) :] if self.window > 1 else []
        return torch.stack([current, *past]).mean(0)

    def step(self, x, dy, gamma, beta):
        """Output and gradients (x, gamma, beta) of one training iteration."""
        self.t += 1
        groups = len(self.hist_sq)
        s = x.shape[0] // groups
        dims = (0, *range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        ys, dxs, dgamma, dbeta, smas, means = [], [], 0.0, 0.0, [], []
        for g in range(groups):
            xg, dyg = x[g * s : (g + 1) * s], dy[g * s : (g + 1) * s]
            chi2_batch = (xg * xg).mean(dims)
            sma = self._sma(chi2_batch, self.hist_sq[g])
            self.hist_sq[g].append(chi2_batch)
            if self.t > self.renorm_start:
                ratio = torch.sqrt(sma + self.eps) / torch.sqrt(self.ema + self.eps)
                r = ratio.clamp(1.0 / self.r_max, self.r_max)
            else:
                r = torch.ones_like(sma)
            std = torch.sqrt(sma + self.eps).view(shape)
            x_hat = xg / std
            ys.append(gamma.view(shape) * r.view(shape) * x_hat + beta.view(shape))
            grad = dyg * gamma.view(shape) * r.view(shape)  # dL/dx_hat
            psi_batch = (grad * x_hat).mean(dims)
            psi = self._sma(psi_batch, self.hist_psi[g])
            self.hist_psi[g].append(psi_batch)
            dxs.append((grad - x_hat * psi.view(shape)) / std)
            dgamma = dgamma + (dyg * r.view(shape) * x_hat).sum(dims)
            dbeta = dbeta + dyg.sum(dims)
            smas.append(sma)
            means.append(xg.mean(dims))
        a = self.momentum
        self.ema = (1 - a) * self.ema + a * torch.stack(smas).mean(0)
        self.running_mean = (1 - a) * self.running_mean + a * torch.stack(means).mean(0)
        return torch.cat(ys), torch.cat(dxs), dgamma, dbeta


def _train_step(layer, x, dy):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


@pytest.mark.parametrize(
    "cls, shape, stat_batch_size",
    [
        (MovingAverageBatchNorm2d, (6, 3, 4, 5), 2),
        (MovingAverageBatchNorm2d, (4, 3, 2, 2), None),
        (MovingAverageBatchNorm1d, (6, 5), 3),
        (MovingAverageBatchNorm1d, (4, 3, 7), 1),
        (MovingAverageBatchNorm3d, (4, 2, 2, 3, 2), 2),
    ],
)
def test_forward_backward_and_moving_averages_match_the_definition(cls, shape, stat_batch_size):
    torch.manual_seed(0)
    options = dict(window_size=3, warmup_steps=2, renorm_start=4, r_max=1.5, momentum=0.3)
    layer = cls(shape[1], dtype=DT, stat_batch_size=stat_batch_size, **options)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    groups = 1 if stat_batch_size is None else shape[0] // stat_batch_size
    ref = Reference(
        shape[1], groups, 3, 2, 4, 1.5, 0.3, layer.eps
    )  # window, warmup, renorm_start, r_max, momentum
    differs = False
    for t in range(8):
        # drifting scale and offset, so windows, EMA and the clipping of r all matter
        x = torch.randn(shape, dtype=DT) * (1.0 + 0.3 * t) + 0.2 * t
        dy = torch.randn(shape, dtype=DT)
        y, dx, dgamma, dbeta = _train_step(layer, x, dy)
        y_ref, dx_ref, dgamma_ref, dbeta_ref = ref.step(x, dy, layer.weight.detach(), layer.bias)
        torch.testing.assert_close(y, y_ref.detach())
        torch.testing.assert_close(dx, dx_ref.detach())
        torch.testing.assert_close(dgamma, dgamma_ref.detach())
        torch.testing.assert_close(dbeta, dbeta_ref.detach())
        torch.testing.assert_close(layer.moving_second_moment(), ref.ema)
        torch.testing.assert_close(layer.running_mean, ref.running_mean)
        if t >= 2:  # the moving averages differ from the exact gradient of the batch's formula
            x_req = x.clone().requires_grad_(True)
            chi2 = (x_req * x_req).mean(dim=(0, *range(2, x.dim())), keepdim=True)
            exact = layer.weight.view(1, -1, *(1,) * (x.dim() - 2)) * x_req / (chi2 + 1e-5).sqrt()
            (grad_exact,) = torch.autograd.grad(exact, x_req, dy)
            differs = differs or not torch.allclose(grad_exact, dx)
    assert differs
    assert int(layer.mabn_step) == 8 and int(layer.num_batches_tracked) == 8
    assert int(layer.sq_count) == 8 and int(layer.psi_count) == 8
    assert layer.window_sq.shape == (2, groups, shape[1])


def test_warmup_is_second_moment_norm_exactly_gradcheck():
    torch.manual_seed(1)
    layer = MovingAverageBatchNorm2d(3, dtype=DT, stat_batch_size=2, warmup_steps=10**6)
    layer.renorm_start = 10**6
    x = torch.randn(4, 3, 2, 3, dtype=DT, requires_grad=True)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    torch.autograd.gradcheck(lambda *a: layer(a[0]), (x, layer.weight, layer.bias))
    # the batch's formula: y = gamma x / sqrt(E_g[x^2] + eps) + beta per group
    y = layer(x)
    for g in range(2):
        part = x[2 * g : 2 * g + 2]
        chi2 = part.square().mean(dim=(0, 2, 3), keepdim=True)
        torch.testing.assert_close(
            y[2 * g : 2 * g + 2], layer.weight.view(1, -1, 1, 1) * part / (chi2 + layer.eps).sqrt()
        )
    # eval modes are ordinary functions too
    layer.eval()
    torch.autograd.gradcheck(lambda a: layer(a), (x,))
    kalmannorm.set_eval_statistics(layer, "batch")
    torch.autograd.gradcheck(lambda a: layer(a), (x,))


def test_eval_modes_and_folding():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), MovingAverageBatchNorm2d(3))
    model.double()
    for _ in range(3):
        model(torch.randn(4, 2, 5, 5, dtype=DT)).sum().backward()
    model.eval()
    norm = model[1]
    x = torch.randn(4, 2, 5, 5, dtype=DT)
    z = model[0](x)
    second = norm.running_var + norm.running_mean.square()
    expected = norm.weight.view(1, -1, 1, 1) * z / (second.view(1, -1, 1, 1) + norm.eps).sqrt()
    expected = expected + norm.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(kalmannorm.fold(model)(x), expected)
    kalmannorm.set_eval_statistics(model, "batch")
    before = norm.running_var.clone()
    with torch.no_grad():
        out = model(x)
    chi2 = z.square().mean(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(
        out,
        norm.weight.view(1, -1, 1, 1) * z / (chi2 + norm.eps).sqrt() + norm.bias.view(1, -1, 1, 1),
    )
    torch.testing.assert_close(norm.running_var, before)


def test_state_dict_round_trip_resumes_windows_and_clock():
    torch.manual_seed(3)
    options = dict(stat_batch_size=2, window_size=4, warmup_steps=1, renorm_start=2)
    a = MovingAverageBatchNorm2d(3, dtype=DT, **options)
    for _ in range(5):
        _train_step(a, torch.randn(4, 3, 3, 3, dtype=DT), torch.randn(4, 3, 3, 3, dtype=DT))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = MovingAverageBatchNorm2d(3, dtype=DT, **options)
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert int(b.mabn_step) == 5 and b.window_psi.shape == (3, 2, 3)
    x, dy = torch.randn(4, 3, 3, 3, dtype=DT), torch.randn(4, 3, 3, 3, dtype=DT)
    for left, right in zip(_train_step(a, x, dy), _train_step(b, x, dy)):
        torch.testing.assert_close(left, right)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value)
    # a deep copy and a pickled model keep working
    c = pickle.loads(pickle.dumps(copy.deepcopy(a)))
    _train_step(c, x, dy)


def test_loads_a_plain_batchnorm_checkpoint_and_converts():
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(3).double()
    bn(torch.randn(8, 3, 4, 4, dtype=DT) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    layer = MovingAverageBatchNorm2d(3, dtype=DT)
    layer.load_state_dict(bn.state_dict())  # strict
    assert int(layer.mabn_step) == 0 and layer.window_sq.numel() == 0
    second = bn.running_var + bn.running_mean.square()
    torch.testing.assert_close(layer.moving_second_moment(), second)
    model = kalmannorm.convert_norm(nn.Sequential(copy.deepcopy(bn)), "mabn", stat_batch_size=2)
    assert type(model[0]) is MovingAverageBatchNorm2d and model[0].stat_batch_size == 2
    torch.testing.assert_close(model[0].moving_second_moment(), second)
    layer.eval(), model.eval()
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    expected = bn.weight.view(1, -1, 1, 1) * x / (second.view(1, -1, 1, 1) + bn.eps).sqrt()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected + bn.bias.view(1, -1, 1, 1))
        torch.testing.assert_close(model(x), expected + bn.bias.view(1, -1, 1, 1))
    built = kalmannorm.build_norm("mabn", 5, dims=3, momentum=0.02, window_size=8)
    assert isinstance(built, MovingAverageBatchNorm3d) and built.momentum == 0.02
    assert built.window_size == 8 and "mabn" in kalmannorm.available_norms()


def test_group_count_change_restarts_windows_and_bad_options():
    layer = MovingAverageBatchNorm2d(2, stat_batch_size=2, window_size=3)
    layer(torch.randn(4, 2, 2, 2)).sum().backward()
    with pytest.warns(UserWarning, match="windows restart"):
        layer(torch.randn(6, 2, 2, 2)).sum().backward()
    assert layer.window_sq.shape == (2, 3, 2) and int(layer.sq_count) == 1
    with pytest.raises(ValueError, match="not divisible by stat_batch_size=2"):
        layer(torch.randn(5, 2, 2, 2))
    with pytest.raises(ValueError, match="expects 4D input"):
        layer(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="window_size must be a positive integer"):
        MovingAverageBatchNorm2d(2, window_size=0)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        MovingAverageBatchNorm2d(2, r_max=0.5)
    # a single value per group and channel is fine: the second moment exists
    MovingAverageBatchNorm1d(3, stat_batch_size=1)(torch.randn(4, 3)).sum().backward()


def test_low_precision_and_no_running_stats():
    layer = MovingAverageBatchNorm2d(3, stat_batch_size=2, warmup_steps=0, renorm_start=0)
    x = torch.randn(4, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(3):
        y = layer(x)
        y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    assert layer.window_sq.dtype == torch.float32
    free = MovingAverageBatchNorm2d(3, track_running_stats=False, window_size=2, warmup_steps=0)
    free(torch.randn(2, 3, 2, 2)).sum().backward()
    free.eval()
    x = torch.randn(2, 3, 2, 2)
    chi2 = x.square().mean(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(free(x), x / (chi2 + free.eps).sqrt())


def test_center_conv_weights():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(16, 2),
    )
    kalmannorm.convert_norm(model, "mabn")
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 4, 4)
    conv = copy.deepcopy(model[3])
    names = center_conv_weights(model)
    assert names == ["0", "3"] and type(model[3]) is CenteredConv2d
    assert type(model[6]) is nn.Linear and set(model.state_dict()) == keys
    assert center_conv_weights(model) == ["0", "3"]  # idempotent
    w = model[3].weight
    torch.testing.assert_close(centered_weight(w).mean(dim=(1, 2, 3)), torch.zeros(4))
    u = torch.randn(2, 4, 4, 4, requires_grad=True)
    expected = nn.functional.conv2d(u, centered_weight(conv.weight), conv.bias, groups=2)
    torch.testing.assert_close(model[3](u), expected)
    model[3](u).square().sum().backward()
    # the gradient reaches the stored weight through the centring: centred itself
    torch.testing.assert_close(w.grad.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-6, rtol=0)
    model(x).sum().backward()
    pickle.loads(pickle.dumps(model))(x)
    assert center_conv_weights(copy.deepcopy(model), "all") == ["0", "3"]
    # folding scales each output channel's weights, which commutes with centring them
    for norm in (model[1], model[4]):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    model.eval()
    torch.testing.assert_close(kalmannorm.fold(model)(x), model(x))
    model.train()
    mlp = nn.Sequential(nn.Linear(3, 4), MovingAverageBatchNorm1d(4))
    assert center_conv_weights(mlp) == ["0"] and type(mlp[0]) is CenteredLinear
    with pytest.raises(ValueError, match="layers must be"):
        center_conv_weights(model, "some")

    class MyConv(nn.Conv2d):
        pass

    odd = nn.Sequential(MyConv(2, 3, 1), MovingAverageBatchNorm2d(3))
    with pytest.raises(TypeError, match="MyConv"):
        center_conv_weights(odd)


def test_inplace_activation_after_the_layer_and_traced_feeding_layers():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU(inplace=True))
    kalmannorm.convert_norm(model, "mabn", stat_batch_size=2)
    # traced discovery: the layer passes its input through, its state stays untouched
    assert center_conv_weights(model, example_input=torch.randn(4, 2, 3, 3)) == ["0"]
    assert int(model[1].mabn_step) == 0 and model[1].window_sq.numel() == 0
    model(torch.randn(4, 2, 3, 3)).sum().backward()
    assert int(model[1].psi_count) == 1


def test_lab_batch_statistics_mode_uses_the_second_moment():
    from kalmannorm.lab.train.batch_mode import batch_statistics_mode

    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).double()
    kalmannorm.convert_norm(model, "mabn", stat_batch_size=2)
    model(torch.randn(4, 2, 3, 3, dtype=DT)).sum().backward()
    x = torch.randn(6, 2, 3, 3, dtype=DT)
    model.eval()
    kalmannorm.set_eval_statistics(model, "batch")
    with torch.no_grad():
        expected = model(x)
    kalmannorm.set_eval_statistics(model, "moving")
    with torch.no_grad(), batch_statistics_mode(model):
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    "options",
    [{"name": "bkn-flow"}, {"name": "bkn", "prior": "propagate", "flow": "execution"}],
    ids=["data-flow", "execution"],
)
def test_a_kalman_prior_propagates_through_the_centred_weight(options):
    """A centred convolution and a plain one holding the centred weight give the same priors."""
    torch.manual_seed(7)
    plain = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5),
    ).double()  # fmt: skip
    holding = copy.deepcopy(plain)
    with torch.no_grad():
        for conv in (holding[0], holding[3]):
            conv.weight.copy_(centered_weight(conv.weight))
    options = dict(options)
    name = options.pop("name")
    centred = kalmannorm.convert_norm(plain, name, stat_batch_size=2, **options)
    center_conv_weights(centred, "all")
    reference = kalmannorm.convert_norm(holding, name, stat_batch_size=2, **options)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(centred(x), reference(x))
    got, want = kalmannorm.kalman_statistics(centred), kalmannorm.kalman_statistics(reference)
    assert got["4"].prior_var is not None
    torch.testing.assert_close(got["4"].prior_mean, want["4"].prior_mean)
    torch.testing.assert_close(got["4"].prior_var, want["4"].prior_var)


def test_the_prior_reuses_the_forward_centring_with_the_same_gradients(monkeypatch):
    """A training step centres each convolution's weight once (the data-flow prior reads the
    forward's centred weight); the gradients equal those of a prior that centres again, and an
    optimizer step (a new weight version) gets a fresh centring."""
    import kalmannorm.layers.moving_average_batch as mabn_module

    torch.manual_seed(3)
    model = conv_bn_stack((3, 4, 5, 5))  # convolutions 0, 3, 6; norms 1, 4, 7
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    model = kalmannorm.convert_norm(model, "bkn-flow", stat_batch_size=2, example_input=x)
    center_conv_weights(model, "all")
    again = copy.deepcopy(model)
    calls = []
    centre = mabn_module.centered_weight
    monkeypatch.setattr(mabn_module, "centered_weight", lambda w: calls.append(w) or centre(w))

    def gradients(net: nn.Module) -> list[torch.Tensor]:
        net.zero_grad()
        net(x).square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    shared = gradients(model)
    assert len(calls) == 3  # one per convolution: the priors of layers 4 and 7 read no other
    monkeypatch.setattr(
        mabn_module._CenteredWeight, "convolved_weight", lambda self: centre(self.weight)
    )
    for got, want in zip(shared, gradients(again), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    monkeypatch.undo()
    conv = model[3]
    with torch.no_grad():
        conv.weight.add_(1.0)  # an optimizer step: the stored weight's version moves
    torch.testing.assert_close(conv.convolved_weight(), centered_weight(conv.weight))
