"""ReDo, continual backprop and RandomOut's `outgoing: zero`: which filters each picks, what is re-drawn,
what is zeroed downstream, what optimizer state restarts, and that a pack gives each seed its own run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from trialfactory import config

from trainers.cgn import CgnMonitor
from trainers.config import RESETTING_SCHEMES, SCHEMES, CbpScheme, RandomOutScheme, RedoScheme
from trainers.data import load_data
from trainers.events import MemorySink
from trainers.filters import filter_groups
from trainers.funcpack import FuncPack
from trainers.loop import build_pack, train
from trainers.models import derive_seeds, draw_filters
from trainers.optim import RowAdam
from trainers.outgoing import (
    Consumer,
    channel_activity,
    consumers,
    hidden_units,
    reset_incoming,
    zero_outgoing,
)
from trainers.pack import PackedNet
from trainers.schemes import REGISTRY, TrainContext, build_scheme
from trainers.schemes.cbp import contribution, lowest
from trainers.schemes.redo import dormant

CPU = torch.device("cpu")
SEEDS = [4, 5, 6]


@pytest.fixture(scope="module")
def digits():
    return load_data(config().data, 0, CPU)


def models(cfg, digits, kind: str):
    """Each seed alone, and the seeds as a pack of `kind` (grouped or generic)."""
    alone = [build_pack(cfg, [s], digits) for s in SEEDS]
    pack = build_pack(cfg, SEEDS, digits, generic=kind == "generic")
    assert isinstance(pack, FuncPack if kind == "generic" else PackedNet)
    return alone, pack


def unpacked(pack, k: int, cfg, digits):
    return pack.unpack(k, build_pack(cfg, [0], digits))


# --- consumers and the zeroing of outgoing weights ------------------------------------------------------


@pytest.mark.parametrize("hidden_fc", [32, 0])
def test_outgoing_of_a_conv_is_the_next_convs_input_slice_and_of_the_last_the_fc_columns(digits, hidden_fc):
    cfg = config(model__filters=3, model__hidden_fc=hidden_fc)
    model = build_pack(cfg, [1], digits)
    first, last = consumers(model, filter_groups(model))
    assert first.weight is model.conv2.conv.weight and not first.linear
    reader = model.hidden if hidden_fc else model.fc
    assert last.weight is reader.weight and last.linear
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    zero_outgoing(optimizer, first, torch.tensor([[False, True, False]]))
    zero_outgoing(optimizer, last, torch.tensor([[True, False, False]]))
    conv2 = model.conv2.conv.weight
    assert torch.count_nonzero(conv2[:, 1]) == 0
    assert torch.equal(conv2[:, [0, 2]], before["conv2.conv.weight"][:, [0, 2]])
    positions = reader.weight.shape[1] // 3  # flatten is channel-major: channel 0 is the first H*W columns
    assert torch.count_nonzero(reader.weight[:, :positions]) == 0
    assert torch.equal(
        reader.weight[:, positions:], before[f"{'hidden' if hidden_fc else 'fc'}.weight"][:, positions:]
    )
    untouched = [
        n for n in before if n not in ("conv2.conv.weight", f"{'hidden' if hidden_fc else 'fc'}.weight")
    ]
    assert all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in untouched)


@pytest.mark.parametrize("kind", ["grouped", "generic"])
@pytest.mark.parametrize("model", [{"name": "crater_cnn"}, {"name": "vanilla_cnn", "depth": 3}])
def test_zeroing_outgoing_in_a_pack_equals_each_seed_alone(digits, kind, model):
    cfg = config(model=model | {"filters": 3, "init": "xavier"})
    alone, pack = models(cfg, digits, kind)
    masks = [torch.tensor([[True, False, False], [False, False, True], [False, False, False]])] * len(
        filter_groups(pack)
    )
    for c, m in zip(consumers(pack, filter_groups(pack)), masks, strict=True):
        zero_outgoing(torch.optim.SGD(pack.parameters(), lr=0.1), c, m)
    for k, single in enumerate(alone):
        for c, m in zip(consumers(single, filter_groups(single)), masks, strict=True):
            zero_outgoing(torch.optim.SGD(single.parameters(), lr=0.1), c, m[k : k + 1])
        mine = unpacked(pack, k, cfg, digits).state_dict()
        assert all(torch.equal(mine[n], v) for n, v in single.state_dict().items())
    assert sum(int((p == 0).sum()) for p in pack.parameters()) > 0


def test_zeroing_outgoing_restarts_sgd_momentum_of_exactly_those_weights():
    weight = torch.nn.Parameter(torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0)))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    zero_outgoing(optimizer, Consumer(weight, 1, 3, linear=False), torch.tensor([[False, True, False]]))
    momentum = optimizer.state[weight]["momentum_buffer"]
    assert torch.count_nonzero(momentum[:, 1]) == 0 and torch.count_nonzero(weight[:, 1]) == 0
    assert torch.equal(momentum[:, [0, 2]], torch.ones(2, 2, 2, 2))


def test_zeroed_outgoing_weights_take_a_fresh_adams_first_step():
    """After the reset a zeroed weight's next update is a fresh Adam's first, -lr * g / (|g| + eps); the
    other weights go on as torch.optim.Adam with the same history."""
    init = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))  # 2 channels x 3 positions
    weight, reference = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    optimizer, torch_adam = RowAdam([weight], lr=0.01), torch.optim.Adam([reference], lr=0.01, foreach=False)
    for _ in range(5):
        for p, opt in ((weight, optimizer), (reference, torch_adam)):
            p.grad = torch.full_like(p, 0.5)
            opt.step()
    zero_outgoing(optimizer, Consumer(weight, 1, 2, linear=True), torch.tensor([[True, False]]))
    state = optimizer.state[weight]
    assert torch.count_nonzero(state["exp_avg"][:, :3]) == 0
    assert torch.count_nonzero(state["exp_avg_sq"][:, :3]) == 0
    assert torch.count_nonzero(weight[:, :3]) == 0
    grad = torch.tensor([[0.2, -3.0, 1.0, 2.0, -1.0, 0.5], [4.0, 0.1, -0.7, 0.3, 2.0, 0.5]])
    for p, opt in ((weight, optimizer), (reference, torch_adam)):
        p.grad = grad.clone()
        opt.step()
    fresh = -0.01 * grad[:, :3] / (grad[:, :3].abs() + 1e-8)
    torch.testing.assert_close(weight.detach()[:, :3], fresh, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weight.detach()[:, 3:], reference.detach()[:, 3:], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(weight.detach()[:, 3:] - init[:, 3:], reference.detach()[:, :3] * 0 - 0.06)


def test_reset_incoming_redraws_rows_zeroes_bias_and_restarts_adam_rows(digits):
    cfg = config(model__filters=3)
    model = build_pack(cfg, [1], digits)
    group = filter_groups(model)[0]
    optimizer = RowAdam(model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    before = group.weight.detach().clone()
    fresh = draw_filters(group.single_shape, "xavier", torch.Generator().manual_seed(2), CPU).unsqueeze(0)
    mask = torch.tensor([[False, True, False]])
    reset_incoming(optimizer, group, mask, fresh)
    assert torch.equal(group.weight[1], fresh[0, 1]) and group.bias[1] == 0
    assert torch.equal(group.weight[[0, 2]], before[[0, 2]]) and group.bias[0] != 0
    state = optimizer.state[group.weight]
    assert torch.count_nonzero(state["exp_avg"][1]) == 0 and state["row_step"][1].item() == 0
    assert torch.count_nonzero(state["exp_avg"][0]) > 0 and state["row_step"][0].item() == 1


# --- ReDo ----------------------------------------------------------------------------------------------


def test_redo_dormant_is_the_normalised_score_at_or_below_tau_per_seed():
    activity = torch.tensor([[1.0, 0.1, 1.9], [10.0, 1.0, 19.0], [0.0, 0.0, 3.0]])  # means 1, 10, 1
    assert dormant(activity, 0.1).tolist() == [
        [False, True, False],
        [False, True, False],
        [True, True, False],
    ]
    assert dormant(activity, 0.0999).tolist() == [
        [False, False, False],
        [False, False, False],
        [True, True, False],
    ]
    assert dormant(activity, 0.0).tolist() == [
        [False, False, False],
        [False, False, False],
        [True, True, False],
    ]


def context(cfg, model, digits, optimizer=None, seeds=(1,)):
    groups = filter_groups(model)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = CgnMonitor(groups, tau=cfg.count_tau, trace_every=0)
    gens = [torch.Generator().manual_seed(derive_seeds(s)[1]) for s in seeds]
    ctx = TrainContext(cfg, model, groups, optimizer, monitor, digits, gens, seeds=list(seeds))
    ctx.batch = digits.x_train[:64]
    return ctx


def test_redo_resets_exactly_the_dormant_filters_at_its_period(digits):
    cfg = config(scheme={"name": "redo", "tau": 0.3, "every": 10}, model__filters=4)
    model = build_pack(cfg, [1], digits)
    with torch.no_grad():
        model.conv1.conv.bias[2] = -100.0  # filter 2 never fires: exactly dead
    ctx = context(cfg, model, digits)
    scheme = build_scheme(cfg.scheme)
    scheme.setup(ctx)
    x = ctx.batch
    h1 = F.relu(model.conv1.conv(x))
    h2 = F.relu(model.conv2.conv(h1))
    by_hand = []
    for h in (h1, h2):
        a = h.abs().mean(dim=(0, 2, 3))
        by_hand.append((a / (a.mean() + 1e-9) <= 0.3).unsqueeze(0))
    assert by_hand[0][0, 2]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx.step = 9
    scheme.after_step(ctx, [])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "only every `every` steps"
    expected_gen = torch.Generator().manual_seed(derive_seeds(1)[1])
    fresh = [draw_filters(g.single_shape, "xavier", expected_gen, CPU) for g in ctx.groups]
    ctx.step = 10
    scheme.after_step(ctx, [])
    for group, mask, draw in zip(ctx.groups, by_hand, fresh, strict=True):
        for f in range(4):
            expected = (draw[f] if mask[0, f] else before[f"{group.name}.conv.weight"][f]).clone()
            if group.name == "conv2":  # its input columns that read a dormant conv1 filter are zeroed
                expected[by_hand[0][0]] = 0.0
            assert torch.equal(group.weight[f], expected)
            assert group.bias[f] == (0.0 if mask[0, f] else before[f"{group.name}.conv.bias"][f])
    conv2, hidden = model.conv2.conv.weight, model.hidden.weight
    for f in range(4):
        if by_hand[0][0, f]:
            assert torch.count_nonzero(conv2[:, f]) == 0
    positions = hidden.shape[1] // 4
    for f in range(4):
        cols = hidden[:, f * positions : (f + 1) * positions]
        dead = by_hand[1][0, f]
        assert (torch.count_nonzero(cols) == 0) == bool(dead)
    assert [r.tolist() for r in ctx.monitor._resets] == [m.long().tolist() for m in by_hand]


# --- continual backprop ---------------------------------------------------------------------------------


def test_cbp_contribution_is_mean_outgoing_magnitude_times_mean_activity():
    conv_w = torch.tensor([[[[1.0]], [[-2.0]]], [[[3.0]], [[0.0]]]])  # [O=2, F=2, 1, 1]
    activity = torch.tensor([[[2.0, 4.0], [1.0, 1.0]]])  # [K=1, F=2, P=2]
    conv = contribution(Consumer(conv_w, 1, 2, linear=False), activity)
    assert conv.tolist() == [[(1 + 3) / 2 * 3.0, (2 + 0) / 2 * 1.0]]
    fc_w = torch.tensor([[1.0, -3.0, 2.0, 0.0]])  # [O=1, F*P = 2*2]: channel 0 is columns 0, 1
    fc = contribution(Consumer(fc_w, 1, 2, linear=True), activity)
    assert fc.tolist() == [[(1 * 2 + 3 * 4) / 2, (2 * 1 + 0 * 1) / 2]]


def test_cbp_picks_the_lowest_utility_among_eligible_filters_only():
    score = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.5, 0.5, 9.0, 1.0]])
    eligible = torch.tensor([[True, True, True, False], [True, True, True, True]])
    assert lowest(score, eligible, torch.tensor([2, 1])).tolist() == [
        [False, True, True, False],
        [True, False, False, False],  # a tie goes to the lower index
    ]
    assert lowest(score, eligible, torch.tensor([0, 9])).tolist() == [[False] * 4, [True] * 4]


def test_cbp_ages_accumulation_and_utility_by_hand(digits):
    """F = 4, m = 2, rho = 0.3. Ages after each step and the accumulated count:
    [1,1,1,1] 0 | [2,2,2,2] 0 | [3,3,3,3] 4 eligible: 1.2 -> 1 replaced, 0.2 | [4,4,4,1] 3: 1.1 -> 1,
    0.1 | [5,5,1,2] 2: 0.7 -> 0 | [6,6,2,3] 3: 1.6 -> 1, 0.6."""
    cfg = config(
        scheme={"name": "cbp", "maturity": 2, "replacement_rate": 0.3, "decay": 0.5}, model__filters=4
    )
    model = build_pack(cfg, [1], digits)
    ctx = context(cfg, model, digits)
    scheme = build_scheme(cfg.scheme)
    scheme.setup(ctx)
    counts = []
    for step in range(6):
        ctx.step = step
        x = digits.x_train[64 * step : 64 * (step + 1)]
        model.train()
        model(x)  # the training forward: CBP scores the outputs it saw (hooks), not a forward of its own
        ctx.batch = digits.x_test[:64]  # so a second forward would see other outputs
        scheme.after_backward(ctx)
        activity = F.relu(model.conv1.conv(x)).abs().mean(dim=0).reshape(1, 4, -1)
        c = contribution(scheme.layers.consumers[0], activity)
        before = scheme.util[0].clone()
        ages = scheme.ages[0].clone() + 1
        scheme.after_step(ctx, [])
        counts.append(int(ctx.monitor._resets[0].sum()) - sum(counts))
        replaced = scheme.ages[0] == 0
        # u <- 0.5 u + 0.5 c for the kept filters; 0 (and age 0) for the replaced ones
        expected = torch.where(replaced, 0.0, 0.5 * before + 0.5 * c)
        torch.testing.assert_close(scheme.util[0], expected)
        if replaced.any():
            corrected = (0.5 * before + 0.5 * c) / (1 - 0.5**ages)
            eligible = ages > 2
            worst = torch.where(eligible, corrected, torch.inf).argmin()
            assert replaced[0, worst]
    assert counts == [0, 0, 1, 1, 0, 1]
    assert scheme.accumulated[0].tolist() == pytest.approx([0.6])


# --- RandomOut's outgoing option ------------------------------------------------------------------------


def test_randomout_outgoing_zero_zeroes_what_reads_the_reset_filters(digits):
    cfg = config(scheme={"name": "randomout", "tau": 0.5, "outgoing": "zero"}, model__filters=3)
    model = build_pack(cfg, [1], digits)
    ctx = context(cfg, model, digits)
    scheme = build_scheme(cfg.scheme)
    scheme.setup(ctx)
    hidden_before = model.hidden.weight.detach().clone()
    scheme.after_step(ctx, [torch.tensor([[0.1, 0.9, 0.9]]), torch.tensor([[0.9, 0.9, 0.1]])])
    # conv2's incoming rows are re-drawn for filter 2 first, then column 0 (read from conv1's filter 0)
    # is zeroed everywhere, the fresh row included.
    assert torch.count_nonzero(model.conv2.conv.weight[:, 0]) == 0
    assert torch.count_nonzero(model.conv2.conv.weight[:, 1:]) > 0
    positions = model.hidden.weight.shape[1] // 3
    assert torch.count_nonzero(model.hidden.weight[:, 2 * positions :]) == 0
    assert torch.equal(model.hidden.weight[:, : 2 * positions], hidden_before[:, : 2 * positions])


def test_randomout_keeps_outgoing_by_default_and_its_trial_keys_do_not_change():
    assert RandomOutScheme().outgoing == "keep"
    keep = config(scheme={"name": "randomout", "outgoing": "keep"})
    assert keep.trial_key() == config(scheme={"name": "randomout"}).trial_key()
    assert "outgoing" not in keep.identity()["scheme"]
    assert config(scheme={"name": "randomout", "outgoing": "zero"}).trial_key() != keep.trial_key()


# --- packs, validation, registry ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["grouped", "generic"])
@pytest.mark.parametrize(
    "scheme",
    [
        {"name": "redo", "tau": 0.5, "every": 5, "units": "all"},
        {"name": "cbp", "maturity": 5, "replacement_rate": 0.05, "units": "all"},
        {"name": "randomout", "tau": 30.0, "outgoing": "zero"},
    ],
    ids=["redo", "cbp", "randomout-zero"],
)
def test_each_seed_in_a_pack_gets_what_it_gets_alone(digits, scheme, kind):
    cfg = config(
        scheme=scheme, model__filters=3, epochs=1, optim={"name": "sgd", "lr": 0.05, "momentum": 0.9}
    )
    packed = train(cfg, MemorySink(), seeds=SEEDS, pack_size=3, data=digits, generic=kind == "generic")
    sink = MemorySink()
    alone = train(cfg, sink, seeds=SEEDS, pack_size=1, data=digits)
    assert [r.total_resets for r in packed] == [r.total_resets for r in alone]
    assert all(r.total_resets > 0 for r in alone)
    filter_resets = sum(e.flat()["resets"] for e in sink.epochs)
    # ReDo and CBP reset the hidden layer's units too (units: all), which only total_resets counts.
    assert (sum(r.total_resets for r in alone) > filter_resets) == (scheme["name"] != "randomout")
    for p, a in zip(packed, alone, strict=True):
        assert p.final_test_loss == pytest.approx(a.final_test_loss, rel=1e-3)


@pytest.mark.parametrize(
    ("scheme", "model", "field"),
    [
        ({"name": "redo"}, "resnet20", "scheme: redo"),
        ({"name": "cbp"}, "inception28", "scheme: cbp"),
        ({"name": "randomout", "outgoing": "zero"}, "resnet20", "scheme.outgoing"),
    ],
)
def test_outgoing_schemes_are_refused_on_nets_without_one_known_consumer(scheme, model, field):
    with pytest.raises(ValidationError) as error:
        config(scheme=scheme, model__name=model, model__hidden_fc=500)
    message = error.value.errors()[0]["msg"]
    assert field in message and "crater_cnn or vanilla_cnn" in message and "\n" not in message
    config(scheme={"name": "randomout"}, model__name=model, model__hidden_fc=500)  # keep: fine


def test_config_fields_are_validated_in_one_line():
    for bad in ({"tau": -1}, {"every": 0}):
        with pytest.raises(ValidationError):
            RedoScheme(**bad)
    for bad in ({"replacement_rate": 1.5}, {"decay": 1.0}, {"maturity": -1}):
        with pytest.raises(ValidationError):
            CbpScheme(**bad)


def test_redo_and_cbp_are_registered_resetting_schemes():
    assert tuple(REGISTRY) == SCHEMES
    assert {"redo", "cbp", "randomout"} <= set(RESETTING_SCHEMES)


def test_the_tables_tau_is_the_cgn_threshold_not_redos_score_threshold():
    from orchestrator.aggregate import setting_of

    assert setting_of({"scheme": {"name": "redo", "tau": 0.1}, "tau": 1e-8})["tau"] == 1e-8
    assert setting_of({"scheme": {"name": "randomout", "tau": 1e-6}, "tau": 1e-8})["tau"] == 1e-6


@pytest.mark.parametrize(
    "scheme",
    [
        {"name": "redo", "tau": 0.9, "every": 7, "units": "all"},
        {"name": "cbp", "maturity": 5, "replacement_rate": 0.05, "units": "all"},
        {"name": "randomout", "tau": 30.0, "outgoing": "zero"},
    ],
    ids=["redo", "cbp", "randomout-zero"],
)
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(digits, scheme):
    """CBP's utilities, ages and accumulated counts, RandomOut's filters reborn at the last step, and
    Adam's per-weight step counts ride in the checkpoint: a resumed trial resets the same filters at
    the same steps."""
    cfg = config(scheme=scheme, epochs=3, model__filters=4)
    full = MemorySink(keep_checkpoints=True)
    train(cfg, full, data=digits)
    resumed = MemorySink()
    train(cfg, resumed, data=digits, resume=full.checkpoints[0][1])
    assert [e.test_acc for e in resumed.epochs] == [e.test_acc for e in full.epochs[1:]]
    assert [e.flat()["resets"] for e in resumed.epochs] == [e.flat()["resets"] for e in full.epochs[1:]]
    assert full.results[0].total_resets > 0
    assert resumed.results[0].total_resets == full.results[0].total_resets  # hidden-unit resets included
    filter_resets = sum(e.flat()["resets"] for e in full.epochs)
    assert (full.results[0].total_resets > filter_resets) == (scheme["name"] != "randomout")


def test_a_reset_filter_of_a_batchnorm_net_restarts_its_batchnorm_too(digits):
    cfg = config(scheme={"name": "redo", "tau": 0.3, "every": 1}, model__filters=4, model__batchnorm=True)
    model = build_pack(cfg, [1], digits)
    model.train()
    model(digits.x_train[:64])  # running statistics move away from 0 / 1
    with torch.no_grad():
        model.conv1.conv.weight[3] = 0.0
        model.conv1.conv.bias[3] = 0.0  # BN of a constant channel is 0, then ReLU: exactly dead
    ctx = context(cfg, model, digits)
    scheme = build_scheme(cfg.scheme)
    scheme.setup(ctx)
    ctx.step = 1
    scheme.after_step(ctx, [])
    bn = model.conv1.bn
    assert ctx.monitor._resets[0][0, 3] == 1
    assert bn.running_mean[3] == 0 and bn.running_var[3] == 1
    assert torch.count_nonzero(model.conv2.conv.weight[:, 3]) == 0


def test_randomout_outgoing_zero_skips_the_one_check_a_reborn_filter_fails_by_construction(digits):
    """The step after a reset back-propagates through zeroed outgoing weights: the reborn filter's CGN
    is exactly 0 there, which must not reset it again (it would, at every step, forever)."""
    cfg = config(scheme={"name": "randomout", "tau": 0.5, "outgoing": "zero"}, model__filters=3)
    model = build_pack(cfg, [1], digits)
    ctx = context(cfg, model, digits)
    scheme = build_scheme(cfg.scheme)
    scheme.setup(ctx)
    zero_first = [torch.tensor([[0.0, 0.9, 0.9]]), torch.tensor([[0.9, 0.9, 0.9]])]
    counts = []
    for step in range(3):
        ctx.step = step
        scheme.after_step(ctx, zero_first)
        counts.append(int(ctx.monitor._resets[0][0, 0]))
    assert counts == [1, 1, 2]  # reset, skipped once, reset again (still below tau after the skip)
    keep = config(scheme={"name": "randomout", "tau": 0.5}, model__filters=3)
    ctx_keep = context(keep, build_pack(keep, [1], digits), digits)
    plain = build_scheme(keep.scheme)
    plain.setup(ctx_keep)
    for step in range(3):
        ctx_keep.step = step
        plain.after_step(ctx_keep, zero_first)
    assert int(ctx_keep.monitor._resets[0][0, 0]) == 3  # keep: every check, as the paper


@pytest.mark.parametrize("kind", ["grouped", "generic"])
def test_filter_outputs_of_a_pack_are_each_seeds_own(digits, kind):
    cfg = config(model__filters=3)
    alone, pack = models(cfg, digits, kind)
    x = digits.x_train[:32]
    packed = channel_activity(pack, filter_groups(pack), x)
    for k, single in enumerate(alone):
        mine = channel_activity(single, filter_groups(single), x)
        h1 = F.relu(single.conv1.conv(x)).abs().mean(dim=0).reshape(3, -1)
        torch.testing.assert_close(mine[0][0], h1)
        for layer, own in zip(packed, mine, strict=True):
            torch.testing.assert_close(layer[k], own[0], rtol=1e-5, atol=1e-6)


# --- hidden linear units (units: all) -------------------------------------------------------------------


def hidden_by_hand(model, x):
    """Per unit of crater_cnn's hidden layer: its output on `x` (no nonlinearity follows it)."""
    h = F.relu(model.conv2.conv(F.relu(model.conv1.conv(x))))
    return model.hidden(h.flatten(1))


def stepped_adam(model, x, y):
    """RowAdam after one real step: every moment of every weight is non-zero."""
    optimizer = RowAdam(model.parameters(), lr=0.01)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("kind", ["alone", "grouped", "generic"])
def test_hidden_units_are_every_linear_layer_but_the_last(digits, kind):
    cfg = config(model__filters=2, model__hidden_fc=5)
    pack = build_pack(cfg, SEEDS[:1] if kind == "alone" else SEEDS, digits, generic=kind == "generic")
    ((group, consumer),) = hidden_units(pack)
    stack = pack.stack if kind == "generic" else pack
    assert group.name == "hidden" and group.weight is stack.hidden.weight and group.bias is stack.hidden.bias
    assert consumer.weight is stack.fc.weight and consumer.linear and consumer.positions == 1
    assert (group.seeds, group.filters) == (1 if kind == "alone" else 3, 5)
    assert hidden_units(build_pack(config(model__hidden_fc=0), [1], digits)) == []
    vanilla = config(model={"name": "vanilla_cnn", "depth": 2, "filters": 2})
    assert hidden_units(build_pack(vanilla, [1], digits)) == []


def test_redo_recycles_dormant_hidden_units_row_bias_outgoing_column_and_adam_state(digits):
    cfg = config(
        scheme={"name": "redo", "tau": 0.4, "every": 1, "units": "all"}, model__filters=2, model__hidden_fc=6
    )
    model = build_pack(cfg, [1], digits)
    x, y = digits.x_train[:64], digits.y_train[:64]
    optimizer = stepped_adam(model, x, y)
    with torch.no_grad():
        model.hidden.weight[4] = 0.0
        model.hidden.bias[4] = 0.0  # unit 4 outputs exactly 0: dormant at any tau
    ctx = context(cfg, model, digits, optimizer)
    ctx.batch = x
    scheme = build_scheme(cfg.scheme)
    scheme.setup(ctx)
    with torch.no_grad():
        a = hidden_by_hand(model, x).abs().mean(dim=0)
        h2 = F.relu(model.conv2.conv(F.relu(model.conv1.conv(x)))).abs().mean(dim=(0, 2, 3))
    dormant_units = a / (a.mean() + 1e-9) <= 0.4
    dead_filters = h2 / (h2.mean() + 1e-9) <= 0.4
    assert dormant_units[4] and not dormant_units.all()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(derive_seeds(1)[1])
    draws = [draw_filters(g.single_shape, "xavier", gen, CPU) for g in scheme.layers.groups]
    ctx.step = 1
    scheme.after_step(ctx, [])
    positions = model.hidden.weight.shape[1] // 2
    for u in range(6):
        row = (draws[2][u] if dormant_units[u] else before["hidden.weight"][u]).clone()
        for f in range(2):  # the columns that read a dead conv2 filter are zeroed after the re-draw
            if dead_filters[f]:
                row[f * positions : (f + 1) * positions] = 0.0
        assert torch.equal(model.hidden.weight[u], row)
        assert model.hidden.bias[u] == (0.0 if dormant_units[u] else before["hidden.bias"][u])
        column = model.fc.weight[:, u]
        assert torch.equal(
            column, torch.zeros_like(column) if dormant_units[u] else before["fc.weight"][:, u]
        )
    assert torch.equal(model.fc.bias, before["fc.bias"])
    state = optimizer.state
    for u in range(6):
        fresh = bool(dormant_units[u])
        assert (torch.count_nonzero(state[model.hidden.weight]["exp_avg"][u]) == 0) == fresh
        assert (state[model.hidden.bias]["exp_avg_sq"][u] == 0) == fresh
        assert (torch.count_nonzero(state[model.fc.weight]["exp_avg"][:, u]) == 0) == fresh
        assert (torch.count_nonzero(state[model.fc.weight]["row_step"][:, u]) == 0) == fresh
    assert ctx.monitor._unit_resets.tolist() == [int(dormant_units.sum())]
    assert ctx.monitor._resets[1].tolist() == [dead_filters.long().tolist()]
    per_seed = ctx.monitor.epoch_end(0, [[0], [0]], [[0.0], [0.0]])
    assert per_seed[0][2] == int(dormant_units.sum()) + int(dead_filters.sum())  # what total_resets adds
    assert sum(s.resets for s in per_seed[0][0]) == int(dead_filters.sum())  # layer rows: filters only


def test_cbp_replaces_the_lowest_contribution_hidden_unit_by_hand(digits):
    """U = 5, F = 2, m = 0, rho = 0.2, eta = 0.5: after one step every unit is eligible, 0.2 x 5 = 1
    unit is replaced (and 0.2 x 2 = 0.4 filters: none). u = 0.5 c, corrected u / (1 - 0.5) = c, with
    c_u = mean |h_u| over the batch x mean_o |fc.weight[o, u]|."""
    cfg = config(
        scheme={"name": "cbp", "maturity": 0, "replacement_rate": 0.2, "decay": 0.5, "units": "all"},
        model__filters=2,
        model__hidden_fc=5,
    )
    model = build_pack(cfg, [1], digits)
    x, y = digits.x_train[:64], digits.y_train[:64]
    optimizer = stepped_adam(model, x, y)
    ctx = context(cfg, model, digits, optimizer)
    scheme = build_scheme(cfg.scheme)
    scheme.setup(ctx)
    model.train()
    model(x)  # the training forward the scores come from
    ctx.batch = digits.x_test[:64]
    scheme.after_backward(ctx)
    with torch.no_grad():
        c = hidden_by_hand(model, x).abs().mean(dim=0) * model.fc.weight.abs().mean(dim=0)
    worst = int(c.argmin())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(derive_seeds(1)[1])
    draws = [draw_filters(g.single_shape, "xavier", gen, CPU) for g in scheme.layers.groups]
    ctx.step = 0
    scheme.after_step(ctx, [])
    replaced = torch.arange(5) == worst
    torch.testing.assert_close(scheme.util[2], torch.where(replaced, 0.0, 0.5 * c).unsqueeze(0))
    assert scheme.ages[2].tolist() == [[0.0 if r else 1.0 for r in replaced]]
    assert scheme.accumulated[2].tolist() == pytest.approx([0.0])
    assert scheme.accumulated[0].tolist() == pytest.approx([0.4])  # conv layers accumulate apart
    assert torch.equal(model.hidden.weight[worst], draws[2][worst]) and model.hidden.bias[worst] == 0
    assert torch.count_nonzero(model.fc.weight[:, worst]) == 0
    keep = ~replaced
    assert torch.equal(model.hidden.weight[keep], before["hidden.weight"][keep])
    assert torch.equal(model.fc.weight[:, keep], before["fc.weight"][:, keep])
    assert all(
        torch.equal(getattr(model, n).conv.weight, before[f"{n}.conv.weight"]) for n in ("conv1", "conv2")
    )
    state = optimizer.state
    assert torch.count_nonzero(state[model.hidden.weight]["exp_avg"][worst]) == 0
    assert torch.count_nonzero(state[model.hidden.weight]["row_step"][worst]) == 0
    assert bool((state[model.hidden.weight]["row_step"][keep] == 1).all())
    assert torch.count_nonzero(state[model.fc.weight]["exp_avg_sq"][:, worst]) == 0
    assert torch.count_nonzero(state[model.fc.weight]["exp_avg"][:, keep]) == keep.sum() * 10
    assert ctx.monitor._unit_resets.tolist() == [1] and all(int(r.sum()) == 0 for r in ctx.monitor._resets)


@pytest.mark.parametrize("kind", ["grouped", "generic"])
def test_hidden_unit_outputs_and_resets_of_a_pack_are_each_seeds_own(digits, kind):
    cfg = config(model__filters=2, model__hidden_fc=5)
    alone, pack = models(cfg, digits, kind)
    x = digits.x_train[:32]
    ((packed_group, packed_consumer),) = hidden_units(pack)
    packed = channel_activity(pack, [packed_group], x)[0]
    mask = torch.tensor([[True, False, False, True, False], [False] * 5, [False, True, False, False, False]])
    fresh = torch.stack([torch.full(packed_group.single_shape, float(k + 1)) for k in range(3)])
    optimizer = torch.optim.SGD(pack.parameters(), lr=0.1)
    reset_incoming(optimizer, packed_group, mask, fresh)
    zero_outgoing(optimizer, packed_consumer, mask)
    for k, single in enumerate(alone):
        ((group, consumer),) = hidden_units(single)
        mine = channel_activity(single, [group], x)[0]
        with torch.no_grad():
            torch.testing.assert_close(mine[0, :, 0], hidden_by_hand(single, x).abs().mean(dim=0))
        torch.testing.assert_close(packed[k], mine[0], rtol=1e-5, atol=1e-6)
        sgd = torch.optim.SGD(single.parameters(), lr=0.1)
        reset_incoming(sgd, group, mask[k : k + 1], fresh[k : k + 1])
        zero_outgoing(sgd, consumer, mask[k : k + 1])
        unpacked_state = unpacked(pack, k, cfg, digits).state_dict()
        assert all(torch.equal(unpacked_state[n], v) for n, v in single.state_dict().items())


@pytest.mark.parametrize(
    "scheme",
    [
        {"name": "redo", "tau": 0.5, "every": 5, "units": "all"},
        {"name": "cbp", "maturity": 5, "replacement_rate": 0.05, "units": "all"},
    ],
    ids=["redo", "cbp"],
)
def test_total_resets_count_hidden_units_and_units_filters_leaves_them_alone(digits, scheme):
    """The epoch rows' `resets` are filter resets (per conv layer); `total_resets` adds the hidden
    units'. `units: filters` is the conv-only scheme: its totals are its rows' sum, and its trial key
    differs from the default `all`, whose key is the scheme without the field."""
    cfg = config(scheme=scheme, epochs=1)
    sink = MemorySink()
    (result,) = train(cfg, sink, data=digits)
    filters_only = sum(e.flat()["resets"] for e in sink.epochs)
    assert result.total_resets > filters_only
    conv_cfg = config(scheme=scheme | {"units": "filters"}, epochs=1)
    conv_sink = MemorySink()
    (conv_result,) = train(conv_cfg, conv_sink, data=digits)
    assert conv_result.total_resets == sum(e.flat()["resets"] for e in conv_sink.epochs)
    default = {k: v for k, v in scheme.items() if k != "units"}  # units: filters is the default
    assert config(scheme=scheme | {"units": "filters"}).trial_key() == config(scheme=default).trial_key()
    assert config(scheme=scheme).trial_key() != config(scheme=default).trial_key()
    assert conv_cfg.trial_key() != cfg.trial_key()


def test_cbp_refuses_a_checkpoint_that_scored_other_layers(digits):
    """A checkpoint from a conv-only run (two layers' utilities) cannot resume a `units: all` trial."""
    cfg = config(scheme={"name": "cbp", "units": "all"}, model__filters=2, model__hidden_fc=5)
    model = build_pack(cfg, [1], digits)
    conv_only = build_scheme(config(scheme={"name": "cbp", "units": "filters"}).scheme)
    conv_only.setup(context(cfg, model, digits))
    scheme = build_scheme(cfg.scheme)
    scheme.load_state_dict(conv_only.state_dict())
    with pytest.raises(ValueError, match="utilities of 2 layers, the trial scores 3"):
        scheme.setup(context(cfg, model, digits))
