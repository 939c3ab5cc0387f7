"""The `batchnorm` scheme on a net the project did not build: BatchNorm2d after every conv by surgery.

The built-in nets take BN as a constructor flag. A user's net is edited instead: every `nn.Conv2d`
module is replaced, where its parent holds it, by `ConvBatchNorm(conv, BatchNorm2d)` with the
project's BN convention (BN_EPS and BN_MOMENTUM here, which the built-in nets share; gamma fixed at
1), so the conv keeps its name as a filter layer and its weights. Two nets cannot be treated that
way, and are refused in one line rather than trained as something other than what the scheme claims:
- a net that already has BatchNorm (it would get a second one; run it under `baseline`);
- a net that calls its convs functionally (`F.conv2d(x, self.conv.weight)`), reuses a conv's weight
  elsewhere, or otherwise does not call the conv module: the inserted BN would never run. A forward
  pass on a sample with hooks on the new BN layers finds that out.
"""

from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-3  # old MXNet BatchNorm default, as in the reference code
BN_MOMENTUM = 0.1  # PyTorch's convention for MXNet's moving-average momentum 0.9


class ConvBatchNorm(nn.Sequential):
    """conv -> BatchNorm2d, what the `batchnorm` surgery puts where a bare conv was.

    A class of its own so the filter layer keeps the conv's own path as its name."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn


class SurgeryError(ValueError):
    """The net cannot take BatchNorm by surgery; the message is the one line to show."""


def insert_batchnorm(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """`model` with a BatchNorm2d after every conv (in place; returned for chaining).

    `sample` is one batch of inputs ([N, C, H, W]). A refused net is left half-operated: build a
    fresh one.
    """
    existing = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if existing:
        raise SurgeryError(
            f"scheme: batchnorm: the net already has BatchNorm ({existing[0]}); "
            "compare it under baseline, or build it without BatchNorm"
        )
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise SurgeryError("scheme: batchnorm: the net has no nn.Conv2d to follow with BatchNorm")
    bns: dict[str, nn.BatchNorm2d] = {}
    for name, conv in convs:
        parent_path, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        bn = nn.BatchNorm2d(conv.out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        bn.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            bn.weight.fill_(1.0)
        bn.weight.requires_grad_(False)  # gamma fixed at 1, as the built-in nets' BN
        setattr(parent, attr, ConvBatchNorm(conv, bn))
        bns[name] = bn
    ran: set[str] = set()
    handles = [bn.register_forward_hook(lambda *_, n=n: ran.add(n)) for n, bn in bns.items()]
    was_training = model.training
    try:
        model.eval()  # eval: the check leaves the new running statistics untouched
        with torch.no_grad():
            model(sample)
    except (AttributeError, TypeError, RuntimeError):
        pass  # e.g. `self.conv.weight` read by a functional call: the conv is now a wrapper
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    silent = [name for name in bns if name not in ran]
    if silent:
        raise SurgeryError(
            f"scheme: batchnorm: conv {silent[0]} is not called as a module (a functional conv or a "
            "shared weight?), so BatchNorm cannot follow it; add BatchNorm in the builder and use baseline"
        )
    return model
