"""Seed packs for any network: K seeds' parameters stacked and run with `torch.func`.

The grouped-conv packs of trainers/pack.py are hand-written for the built-in feed-forward nets. A
`FuncPack` packs any `nn.Module`: every parameter and buffer of the K models is stacked along a new
leading dimension (`stack_module_state`) and one forward is `vmap` over those stacks of a
`functional_call` on a template of the net. vmap's batching rules turn a conv with stacked weights
into one grouped conv and a linear into one batched matmul, as the hand-written packs do, so a pack
of any net costs about what a grouped pack costs.

The stacked tensors live in `stack`, a copy of the net whose parameters are [K, ...] leaves: the
optimizer, the schemes' [K, F] row views, checkpoints and IMP/edge-popup masks all see ordinary
parameters laid out seed-major. Nothing couples the seeds (the loss is the sum of per-seed mean
losses, optimizers are elementwise), exactly as for grouped packs.

Not every net can be batched this way: BatchNorm's running statistics are updated in place in
train mode, random ops (dropout) would need per-seed randomness, and data-dependent control flow
or in-place writes into a captured tensor fail under vmap. `generic_pack_problem` finds out on one
sample before training and says why in one line; such nets run one seed per trial.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class FuncPack(nn.Module):
    """K copies of one architecture, parameters stacked [K, ...]; returns logits [K, B, classes]."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.seeds = len(models)
        # A custom net's source hash (trainers/models.py) belongs in every packed seed's result too.
        self.builder_sha256: str = getattr(models[0], "builder_sha256", "")
        params, buffers = stack_module_state(models)
        stack = copy.deepcopy(models[0])
        with torch.no_grad():
            for name, value in params.items():
                owner, attr = _owner(stack, name)
                requires_grad = owner._parameters[attr].requires_grad
                owner._parameters[attr] = nn.Parameter(value.detach().clone(), requires_grad=requires_grad)
            for name, value in buffers.items():
                owner, attr = _owner(stack, name)
                owner._buffers[attr] = value.detach().clone()
        self.stack = stack
        # The template only lends its code: every tensor it uses comes from `stack` at call time, so
        # it sits on the meta device and is kept out of the module tree (no state_dict entries, no .to).
        object.__setattr__(self, "template", copy.deepcopy(models[0]).to("meta"))
        self._named: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def train(self, mode: bool = True) -> FuncPack:
        super().train(mode)
        self.template.train(mode)
        return self

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's signature
        self._named = None  # .to()/.cuda() may give the stack new tensors: look them up again
        return super()._apply(fn, recurse)

    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The stack's parameters and buffers by name, looked up once: walking the module tree every
        step cost a tiny net's step several per cent. Every edit (optimizer, schemes, checkpoint loads)
        is in place on these very tensors, so the lookup stays valid."""
        named = getattr(self, "_named", None)
        if named is None:
            named = dict(self.stack.named_parameters()), dict(self.stack.named_buffers())
            self._named = named
        return named

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params, buffers = self._tensors()
        return vmap(self._one_seed, in_dims=(0, 0, None))(params, buffers, x)

    def _one_seed(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor):
        return functional_call(self.template, (params, buffers), (x,))

    def seed_forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Seed `index` alone, without vmap, through the template: forward hooks on the template's
        modules then see ordinary tensors (RePr's activation criteria need that)."""
        params, buffers = self._tensors()
        pick = {n: t[index] for n, t in params.items()}, {n: t[index] for n, t in buffers.items()}
        return functional_call(self.template, pick, (x,))

    def unpack(self, index: int, into: nn.Module) -> nn.Module:
        """Seed `index`'s weights as an ordinary model (for checks and export)."""
        with torch.no_grad():
            state = {name: t[index] for name, t in self.stack.state_dict().items()}
            into.load_state_dict(state)
        return into


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def generic_pack_problem(model: nn.Module, sample: torch.Tensor) -> str | None:
    """Why `model` cannot run as a `FuncPack` (one line), or None when it can.

    Checked on the real net and a real batch: a two-seed pack of copies of `model` must run forward
    and backward in train mode and give each seed exactly the logits it gives alone.
    """
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        return (
            f"BatchNorm ({norms[0]}) updates running statistics in train mode, which vmap cannot batch per "
            "seed; this net trains one seed per trial"
        )
    was_training = model.training
    try:
        model.train()
        pack = FuncPack([model, model])
        with torch.no_grad():
            alone = model(sample)
        logits = pack(sample)
        logits.sum().backward()
    except Exception as error:  # noqa: BLE001 - any failure under vmap means: no generic pack
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"vmap cannot batch this net ({type(error).__name__}: {reason}); it trains one seed per trial"
    finally:
        model.train(was_training)
    if logits.shape[1:] != alone.shape or not torch.allclose(logits[0].detach(), alone, rtol=1e-4, atol=1e-5):
        return "the vmapped net does not reproduce the net's own output; it trains one seed per trial"
    return None
