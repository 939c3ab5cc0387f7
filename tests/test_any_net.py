"""Every scheme and seed packs on convolutional nets the project did not write.

The test nets nest Sequential and ModuleDict, use a depthwise and a grouped conv, and add a residual
sum: filters must be found by walking the module tree and named by module path, and every scheme
edit must land on exactly the filter it means.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trialfactory import config

from trainers.cgn import CgnMonitor
from trainers.config import TrialConfig
from trainers.data import load_data
from trainers.events import MemorySink
from trainers.filters import conv_layers, filter_groups
from trainers.funcpack import FuncPack, generic_pack_problem
from trainers.loop import build_pack, train
from trainers.masks import masked_weights
from trainers.models import draw_filters
from trainers.optim import RowAdam
from trainers.ranking import pack_logits, pack_loss
from trainers.schemes import TrainContext, build_scheme
from trainers.surgery import SurgeryError, insert_batchnorm

NESTED_LAYERS = ["stem.0", "blocks.dw.0", "blocks.pw", "grouped", "res.conv1", "res.conv2"]


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class NestedNet(nn.Module):
    """stem (Sequential) -> depthwise + pointwise (ModuleDict) -> grouped conv -> residual block -> FC."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleDict(
            {
                "dw": nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU()),
                "pw": nn.Conv2d(4, 6, 1),
            }
        )
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.res = Residual(6)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.blocks["pw"](self.blocks["dw"](x)))
        return self.head(self.res(F.relu(self.grouped(x))))


def nested(seed: int) -> NestedNet:
    torch.manual_seed(seed)
    return NestedNet()


def batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def context(model: nn.Module, scheme, seeds: list[int], cfg: TrialConfig | None = None) -> TrainContext:
    cfg = cfg or config()
    scheme_gens = [torch.Generator().manual_seed(1000 + s) for s in seeds]
    scheme.prepare(model, scheme_gens)
    groups = filter_groups(model)
    ctx = TrainContext(
        cfg,
        model,
        groups,
        RowAdam(scheme.parameters(model), lr=1e-2),
        CgnMonitor(groups, tau=cfg.count_tau, trace_every=0),
        None,
        scheme_gens,
        seeds=seeds,
    )
    scheme.setup(ctx)
    return ctx


def step(ctx: TrainContext, scheme, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """One training step as trainers/loop.py takes it."""
    loss, _ = pack_loss(pack_logits(ctx.model, x), y)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    cgns = ctx.monitor.observe(ctx.step, len(y))
    scheme.after_backward(ctx)
    ctx.optimizer.step()
    scheme.after_step(ctx, cgns)
    ctx.step += 1
    return cgns


# -- filters of any net --------------------------------------------------------------------------------


def test_filters_are_every_conv_by_module_path_grouped_and_depthwise_included():
    model = nested(0)
    groups = filter_groups(model)
    assert [g.name for g in groups] == NESTED_LAYERS == list(conv_layers(model))
    assert [g.filters for g in groups] == [4, 4, 6, 6, 6, 6]
    dw = groups[1]
    # A depthwise filter is one output channel: weight[o] has in_channels / groups = 1 input channel.
    assert dw.single_shape == (4, 1, 3, 3) and dw.rows(dw.weight).shape == (1, 4, 9)
    assert groups[3].single_shape == (6, 3, 3, 3)
    convs = conv_layers(model).values()
    assert all(g.bn is None and g.act is conv for g, conv in zip(groups, convs, strict=True))


@pytest.mark.parametrize("name", ["crater_cnn", "vanilla_cnn", "inception28", "resnet20"])
def test_built_in_nets_keep_their_layer_names(name):
    cfg = config(model={"name": name, "filters": 3, "depth": 2, "hidden_fc": 0})
    data = load_data(cfg.data, 0, torch.device("cpu"))
    model = build_pack(cfg, [1], data)
    assert [(g.name, g.bn, g.act) for g in filter_groups(model)] == [
        (layer.name, layer.bn, layer.act) for layer in model.filter_layers()
    ]
    assert [w.name for w in masked_weights(model, "conv")] == [layer.name for layer in model.filter_layers()]


def test_layer_default_init_draws_as_pytorch_from_the_seeds_generator():
    """RandomOut's redraw for a net without a project initializer: kaiming_uniform(a=sqrt(5)) with the
    layer's own fan_in (9 for a 3x3 depthwise filter, so |w| <= 1/3), from the scheme's generator."""
    drawn = draw_filters((4, 1, 3, 3), None, torch.Generator().manual_seed(3), torch.device("cpu"))
    expected = nn.init.kaiming_uniform_(
        torch.empty(4, 1, 3, 3), a=math.sqrt(5), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(drawn, expected)
    assert drawn.abs().max() <= 1 / 3 and drawn.abs().max() > 0.25


# -- RandomOut -----------------------------------------------------------------------------------------


def test_randomout_redraws_exactly_the_dead_filter_of_a_depthwise_layer():
    model = nested(0)
    scheme = build_scheme(TrialConfig.model_validate({"scheme": {"name": "randomout", "tau": 1.0}}).scheme)
    ctx = context(model, scheme, [0], config(model__init="xavier"))
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    shadow = torch.Generator().manual_seed(1000)
    # CGNs above tau everywhere but filter 2 of the depthwise layer.
    cgns = [torch.full((1, g.filters), 5.0) for g in ctx.groups]
    cgns[1][0, 2] = 0.5
    scheme.after_step(ctx, cgns)
    expected = [draw_filters(g.single_shape, "xavier", shadow, torch.device("cpu")) for g in ctx.groups]
    after = model.state_dict()
    assert torch.equal(after["blocks.dw.0.weight"][2], expected[1][2])
    assert not torch.equal(after["blocks.dw.0.weight"][2], before["blocks.dw.0.weight"][2])
    unchanged = [n for n in before if torch.equal(after[n], before[n])]
    assert set(before) - set(unchanged) == {"blocks.dw.0.weight"}
    keep = [0, 1, 3]
    assert torch.equal(after["blocks.dw.0.weight"][keep], before["blocks.dw.0.weight"][keep])
    assert ctx.monitor._resets[1].tolist() == [[0, 0, 1, 0]]


# -- RePr ----------------------------------------------------------------------------------------------


def repr_scheme(**fields):
    doc = {"name": "repr", "s1": 1, "s2": 1, "n_iter": 1, "drop_fraction": 0.3} | fields
    return build_scheme(TrialConfig.model_validate({"scheme": doc}).scheme)


def test_repr_ranks_across_all_convs_minus_excluded_globs_and_reintroduces_orthogonally():
    model = nested(0)
    scheme = repr_scheme(exclude_layers=["blocks.*"])
    ctx = context(model, scheme, [0], config(model__init="xavier"))
    x, y = batch()
    step(ctx, scheme, x, y)
    scheme.on_epoch_end(ctx, 0)  # S1 done: drop
    dropped = [int(m.sum()) for m in scheme.drop]
    # Eligible: grouped, res.conv1, res.conv2 (18 filters); stem is the first layer, blocks.* excluded.
    assert dropped[:3] == [0, 0, 0] and sum(dropped) == round(0.3 * 18)
    for group, mask in zip(ctx.groups, scheme.drop, strict=True):
        assert torch.all(group.rows(group.weight)[mask] == 0) and torch.all(group.rows(group.bias)[mask] == 0)
    step(ctx, scheme, x, y)
    for group, mask in zip(ctx.groups, scheme.drop, strict=True):
        assert torch.all(group.rows(group.weight)[mask] == 0)  # dropped filters stay dropped in S2
    masks = [m.clone() for m in scheme.drop]
    scheme.on_epoch_end(ctx, 1)  # re-introduce
    assert scheme.drop is None
    for group, mask in zip(ctx.groups, masks, strict=True):
        rows = group.rows(group.weight)[0].detach()
        if mask[0].any():
            new, kept = rows[mask[0]], rows[~mask[0]]
            assert torch.all(new.norm(dim=1) > 0)
            assert (new @ kept.T).abs().max() < 1e-4 * new.norm() * kept.norm()


def test_repr_exclude_layers_that_match_nothing_is_refused_in_one_line():
    with pytest.raises(
        ValueError, match=r"^scheme.exclude_layers: 'nope\*' matches no conv layer; layers: stem.0"
    ):
        context(nested(0), repr_scheme(exclude_layers=["nope*"]), [0])


# -- batchnorm by surgery ------------------------------------------------------------------------------


def test_batchnorm_surgery_puts_bn_after_every_conv_keeping_names_and_weights():
    model = nested(0)
    weights = {n: c.weight.detach().clone() for n, c in conv_layers(model).items()}
    x, _ = batch()
    insert_batchnorm(model, x)
    groups = filter_groups(model)
    assert [g.name for g in groups] == NESTED_LAYERS
    assert all(isinstance(g.bn, nn.BatchNorm2d) and g.bn.num_features == g.filters for g in groups)
    assert all(torch.equal(g.weight, weights[g.name]) for g in groups)
    seen = []
    hooks = [g.bn.register_forward_hook(lambda m, i, o, n=g.name: seen.append(n)) for g in groups]
    model.train()
    model(x)
    for h in hooks:
        h.remove()
    assert sorted(seen) == sorted(NESTED_LAYERS)
    # The BN output is the layer's output: train-mode batch statistics normalise it per channel.
    out = []
    groups[2].act.register_forward_hook(lambda m, i, o: out.append(o))
    model(x)
    assert out[0].mean(dim=(0, 2, 3)).abs().max() < 1e-5


def test_batchnorm_surgery_refuses_a_net_with_batchnorm():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(SurgeryError, match=r"^scheme: batchnorm: the net already has BatchNorm \(1\)"):
        insert_batchnorm(net, batch()[0])


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(F.conv2d(x, self.conv.weight, self.conv.bias).flatten(1))


def test_batchnorm_surgery_refuses_a_net_that_calls_its_conv_functionally():
    with pytest.raises(SurgeryError, match=r"^scheme: batchnorm: conv conv is not called as a module"):
        insert_batchnorm(FunctionalConv(), batch()[0])


# -- IMP and edge-popup --------------------------------------------------------------------------------


def test_masked_weights_cover_every_conv_and_linear_by_module_path():
    names = [(w.name, w.kind) for w in masked_weights(nested(0))]
    assert names == [(n, "conv") for n in NESTED_LAYERS] + [("head.2", "linear")]


def test_edgepopup_keeps_the_top_k_scores_of_every_conv_and_linear():
    model = nested(0)
    scheme = build_scheme(TrialConfig.model_validate({"scheme": {"name": "edgepopup", "k": 0.5}}).scheme)
    ctx = context(model, scheme, [0])
    x, y = batch()
    step(ctx, scheme, x, y)
    for w, w0, s in zip(scheme.weights, scheme.frozen, scheme.scores, strict=True):
        kept = w.weight.detach() != 0
        assert int(kept.sum()) == round(0.5 * w.weight.numel())
        assert torch.equal(w.weight.detach()[kept], w0[kept])
        threshold = s.detach().abs()[kept].min()
        assert torch.all(s.detach().abs()[~kept] <= threshold)


def test_imp_prunes_every_conv_and_linear_of_a_nested_net():
    model = nested(0)
    cfg = TrialConfig.model_validate({"epochs": 1, "scheme": {"name": "imp", "rounds": 1, "rate": 0.5}})
    scheme = build_scheme(cfg.scheme)
    ctx = context(model, scheme, [0], cfg)
    x, y = batch()
    step(ctx, scheme, x, y)
    scheme.on_epoch_end(ctx, 0)
    step(ctx, scheme, x, y)
    for w in scheme.weights:
        assert w.per_seed(w.weight).ne(0).sum() == w.weight.numel() - round(0.5 * w.weight.numel())


# -- generic seed packs --------------------------------------------------------------------------------

# vmap turns a conv with stacked weights into a grouped conv, as the grouped packs do: sums run in
# another order, so outputs agree to float32 rounding, and a few Adam steps keep that.
FORWARD_TOL = dict(rtol=1e-5, atol=1e-6)
TRAIN_TOL = dict(rtol=1e-4, atol=1e-5)


def test_a_generic_pack_gives_each_seed_its_own_logits():
    models = [nested(s) for s in (1, 2, 3)]
    pack = FuncPack(models)
    x, _ = batch()
    packed = pack(x)
    assert packed.shape == (3, 16, 10)
    for k, model in enumerate(models):
        torch.testing.assert_close(packed[k], model(x), **FORWARD_TOL)


@pytest.mark.slow
def test_a_generic_pack_trains_each_seed_as_alone_with_randomout_resets_and_adam():
    """Per-seed resets (from each seed's own generator) and per-row Adam restarts, packed or not."""
    seeds = [1, 2, 3]
    cfg = TrialConfig.model_validate(
        {
            "scheme": {"name": "randomout", "tau": 0.05, "reset_optimizer_state": True},
            "model": {"init": "xavier"},
        }
    )
    pack_scheme = build_scheme(cfg.scheme)
    pack_ctx = context(FuncPack([nested(s) for s in seeds]), pack_scheme, seeds, cfg)
    alone = []
    for s in seeds:
        scheme = build_scheme(cfg.scheme)
        alone.append((context(nested(s), scheme, [s], cfg), scheme))
    resets = torch.zeros(len(seeds))
    for i in range(6):
        x, y = batch(seed=i)
        packed_cgn = step(pack_ctx, pack_scheme, x, y)
        for k, (ctx, scheme) in enumerate(alone):
            cgn = step(ctx, scheme, x, y)
            resets[k] += sum(int((c < 0.05).sum()) for c in cgn)
            assert [int((c[k] < 0.05).sum()) for c in packed_cgn] == [int((c < 0.05).sum()) for c in cgn]
    assert 0 < resets.sum() < 6 * 32 * 3  # some filters reset, not all
    for k, (ctx, _) in enumerate(alone):
        unpacked = pack_ctx.model.unpack(k, nested(0))
        for name, value in ctx.model.state_dict().items():
            torch.testing.assert_close(unpacked.state_dict()[name], value, **TRAIN_TOL)


@pytest.fixture(scope="module")
def digits():
    return load_data(config().data, 0, torch.device("cpu"))


@pytest.mark.parametrize(
    ("model", "scheme"),
    [("crater_cnn", {"name": "randomout", "tau": 30.0}), ("vanilla_cnn", {"name": "repr", "s1": 1, "s2": 1})],
    ids=["crater_cnn-randomout", "vanilla_cnn-repr"],
)
@pytest.mark.slow
def test_generic_packs_of_built_in_nets_match_seeds_alone(digits, scheme, model):
    seeds = [5, 6]
    scheme = scheme | ({"n_iter": 1} if scheme["name"] == "repr" else {})
    cfg = config(scheme=scheme, model={"name": model, "filters": 4, "depth": 2}, epochs=2)
    packed, alone = MemorySink(), MemorySink()
    train(cfg, packed, seeds=seeds, pack_size=2, data=digits, generic=True)
    train(cfg, alone, seeds=seeds, pack_size=1, data=digits)
    for rp, ra in zip(packed.epochs, sorted(alone.epochs, key=lambda r: (r.epoch, r.seed)), strict=True):
        assert (rp.seed, rp.epoch) == (ra.seed, ra.epoch)
        assert rp.train_loss == pytest.approx(ra.train_loss, rel=1e-3)
        assert rp.test_acc == pytest.approx(ra.test_acc, abs=3 / 449)
        assert [layer.layer for layer in rp.layers] == [layer.layer for layer in ra.layers]
        assert rp.flat()["dropped"] == ra.flat()["dropped"]
    assert [r.total_resets for r in packed.results] == [r.total_resets for r in alone.results]
    assert sum(r.total_resets for r in packed.results) > 0


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom"


def test_the_example_net_packed_trains_each_seed_as_alone():
    """examples/custom as its spec trains it (Adam, batch 32), RandomOut at a tau where filters reset:
    a generic pack of two seeds ends each seed's weights where that seed alone ends them."""
    doc = {
        "model": {"name": "custom", "builder": "net.py:build", "kwargs": {"width": 8}, "init": "kaiming"},
        "data": {"name": "custom", "loader": "data.py:load", "kwargs": {"train": 192}},
        "scheme": {"name": "randomout", "tau": 0.5},
        "optim": {"name": "adam", "lr": 0.01},
        "epochs": 2,
        "batch_size": 32,
    }
    for section in ("model", "data"):
        doc[section]["base_dir"] = str(EXAMPLE)
    cfg = TrialConfig.model_validate(doc)
    data = load_data(cfg.data, cfg.data_seed, torch.device("cpu"))
    seeds = [3, 4]
    packed, alone = MemorySink(keep_checkpoints=True), MemorySink(keep_checkpoints=True)
    train(cfg, packed, seeds=seeds, pack_size=2, data=data)  # a custom net: a generic pack
    train(cfg, alone, seeds=seeds, pack_size=1, data=data)
    assert [r.pack_size for r in packed.results] == [2, 2]
    assert [r.total_resets for r in packed.results] == [r.total_resets for r in alone.results]
    assert sum(r.total_resets for r in alone.results) > 0
    (epoch, state), *_ = reversed(packed.checkpoints)  # the pack's weights after epoch 1 of 2
    singles = [s for e, s in alone.checkpoints if e == epoch]
    assert len(singles) == 2
    worst = 0.0
    for k, single in enumerate(singles):
        for name, value in single["model"].items():
            stacked = state["model"][f"stack.{name}"][k]
            torch.testing.assert_close(stacked, value, **TRAIN_TOL)
            worst = max(worst, float((stacked - value).abs().max()))
    for rp, ra in zip(packed.epochs, sorted(alone.epochs, key=lambda r: (r.epoch, r.seed)), strict=True):
        assert rp.train_loss == pytest.approx(ra.train_loss, rel=1e-4)
    print(f"example net, packed vs alone after {epoch + 1} epochs: max |weight difference| {worst:.2e}")


class Dropping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.conv(x)).flatten(1)


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        out = self.conv(x)
        return out.flatten(1) if out.sum() > 0 else -out.flatten(1)


def test_nets_vmap_cannot_batch_are_named_in_one_line():
    x, _ = batch()
    assert generic_pack_problem(nested(0), x) is None
    problems = {
        "bn": generic_pack_problem(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten()), x),
        "dropout": generic_pack_problem(Dropping(), x),
        "branch": generic_pack_problem(Branching(), x),
    }
    assert problems["bn"].startswith("BatchNorm (1) updates running statistics")
    for name in ("dropout", "branch"):
        assert problems[name].startswith("vmap cannot batch this net") and "\n" not in problems[name], name
        assert problems[name].endswith("it trains one seed per trial")


@pytest.mark.parametrize("metric", ["taylor", "apoz", "oracle", "ortho"])
@pytest.mark.slow
def test_repr_ranks_each_seed_of_a_generic_pack_as_alone(metric):
    """Activation criteria hook the template's layers, one seed at a time, in the pack's [K, F] layout."""
    from types import SimpleNamespace

    from trainers.ranking import score_filters

    x, y = batch(32)
    data = SimpleNamespace(x_val=x, y_val=y)
    models = [nested(s) for s in (1, 2)]
    pack = FuncPack(models)
    packed = score_filters(metric, pack, filter_groups(pack), data, [], [])
    for k, model in enumerate(models):
        alone = score_filters(metric, model, filter_groups(model), data, [], [])
        for p, a in zip(packed, alone, strict=True):
            torch.testing.assert_close(p[k], a[0], rtol=1e-4, atol=1e-6)
