"""Knocking-heads transforms: the paper's contribution (Zhou et al., 2025, section 3).

One transform per target (q, k or v), shared by every head of that target and applied to the last
(feature) dimension of a ``(..., heads, head_dim)`` tensor, so the gradient of its parameters gathers
every head while heads never exchange features in the forward pass.

- ``linear``: ``x @ T`` (eq. 5-7), ``T`` initialised to the identity; foldable into the projection (eq. 8).
- ``mlp``:    ``2 * ((x @ W_up) * sigmoid(x @ W_gate)) @ W_down`` (eq. 9); ``W_up``, ``W_down`` identity,
  ``W_gate`` zero, so ``2 * sigmoid(0) = 1`` and the transform starts as the identity.
- ``gate``:   ``2 * x * sigmoid(x @ W_gate)`` (the Table 2 ablation), ``W_gate`` zero.

Parameters are plain ``nn.Parameter`` matrices used as ``x @ W`` (input dim first), never ``nn.Linear``,
so generic ``nn.Linear`` re-initialisers leave them alone. Their initialisation draws no random numbers,
so a knocked model built under a seed has the same base weights as the baseline built under that seed.
"""

from __future__ import annotations

import torch
from torch import nn

KNOCK_TYPES = ("none", "linear", "mlp", "gate")
KNOCK_TARGETS = ("q", "k", "v")
# The paper's defaults: KHA-Linear on Q, K and V; KHA-MLP on V (gate, an ablation, on V as in Table 2).
DEFAULT_TARGETS = {"none": (), "linear": ("q", "k", "v"), "mlp": ("v",), "gate": ("v",)}
# Square head_dim x head_dim matrices each knock type owns (for parameter and FLOP accounting).
MATRICES_PER_KNOCK = {"none": 0, "linear": 1, "mlp": 3, "gate": 1}


def parse_targets(knock: str, targets) -> tuple[str, ...]:
    """Validate a knock type and normalise its targets (``"qkv"``, ``["q", "v"]``, None = paper default)."""
    if knock not in KNOCK_TYPES:
        raise ValueError(f"unknown knock type {knock!r}; valid types are {', '.join(KNOCK_TYPES)}")
    if knock == "none":
        if targets:  # None, "" or () only: targets without a knock would be dropped silently
            raise ValueError(f"knock targets {targets!r} given with knock 'none'; choose a knock type "
                             f"({', '.join(KNOCK_TYPES[1:])}) or leave the targets out")
        return ()
    if targets is None:
        return DEFAULT_TARGETS[knock]
    items = list(targets) if not isinstance(targets, str) else list(targets.replace(",", ""))
    bad = [t for t in items if t not in KNOCK_TARGETS]
    if bad:
        raise ValueError(f"unknown knock target(s) {bad!r} in {targets!r}; valid targets are q, k, v")
    if not items:
        raise ValueError(f"knock {knock!r} needs at least one target out of q, k, v (got {targets!r})")
    if len(set(items)) != len(items):
        raise ValueError(f"knock targets {targets!r} name a target twice")
    return tuple(t for t in KNOCK_TARGETS if t in items)


class LinearKnock(nn.Module):
    """KHA-Linear: ``x @ T``, ``T`` identity at init."""

    foldable = True
    identity_init = ("weight",)  # the parameters initialised to the identity (the rest start at zero)

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.weight.shape[0]))


class MLPKnock(nn.Module):
    """KHA-MLP (eq. 9): ``2 * ((x @ W_up) * sigmoid(x @ W_gate)) @ W_down``; identity at init."""

    foldable = False
    identity_init = ("w_up", "w_down")

    def __init__(self, head_dim: int):
        super().__init__()
        self.w_up = nn.Parameter(torch.eye(head_dim))
        self.w_gate = nn.Parameter(torch.zeros(head_dim, head_dim))
        self.w_down = nn.Parameter(torch.eye(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        hidden = (x @ self.w_up.to(dt)) * torch.sigmoid(x @ self.w_gate.to(dt))
        return 2.0 * (hidden @ self.w_down.to(dt))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            n = self.w_up.shape[0]
            self.w_up.copy_(torch.eye(n))
            self.w_gate.zero_()
            self.w_down.copy_(torch.eye(n))


class GateKnock(nn.Module):
    """Gate-only knock (Table 2 ablation, known to hurt): ``2 * x * sigmoid(x @ W_gate)``; identity at init."""

    foldable = False
    identity_init = ()

    def __init__(self, head_dim: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(head_dim, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x * torch.sigmoid(x @ self.w_gate.to(x.dtype))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w_gate.zero_()


_KNOCK_CLASSES = {"linear": LinearKnock, "mlp": MLPKnock, "gate": GateKnock}


def make_knocks(knock: str, targets: tuple[str, ...], head_dim: int) -> nn.ModuleDict:
    """One shared knock module per target, keyed ``"q"``, ``"k"``, ``"v"``."""
    if knock == "none":
        return nn.ModuleDict()
    return nn.ModuleDict({t: _KNOCK_CLASSES[knock](head_dim) for t in targets})


def fold_into_linear(proj: nn.Linear, knock: LinearKnock, head_dim: int) -> None:
    """Absorb ``T`` into a head projection in place (eq. 8).

    ``proj`` maps to ``heads * head_dim`` features; head ``i``'s rows ``W_i`` (``head_dim x d``) give
    ``y_i = x W_i^T + b_i``, so ``y_i T = x (T^T W_i)^T + b_i T``.
    """
    t = knock.weight.detach()
    with torch.no_grad():
        w = proj.weight.view(-1, head_dim, proj.weight.shape[-1])  # (heads, head_dim, d)
        proj.weight.copy_(torch.matmul(t.t().to(w.dtype), w).reshape_as(proj.weight))
        if proj.bias is not None:
            b = proj.bias.view(-1, head_dim)
            proj.bias.copy_((b @ t.to(b.dtype)).reshape_as(proj.bias))


def fold_knocks(module: nn.Module) -> nn.Module:
    """Fold every linear knock under ``module`` into its projection, in place, and remove it.

    Afterwards the module has exactly the baseline's parameters and computes the same function.
    MLP and gate knocks are non-linear: nothing is changed and ``ValueError`` says why.
    Every module that owns knocks (a ``knocks`` ModuleDict) implements ``fold_knocks()``; a model config above
    them (``DecoderLM.cfg``, ``KHAForCausalLM.config``) is set to knock ``none`` too, so it says what runs.
    """
    owners = [m for m in module.modules() if isinstance(getattr(m, "knocks", None), nn.ModuleDict)]
    for m in owners:
        for target, knock in m.knocks.items():
            if not getattr(knock, "foldable", False):
                raise ValueError(
                    f"cannot fold the {type(knock).__name__} on {target!r}: only linear knocks fold into "
                    "the projections (eq. 8); MLP and gate knocks are non-linear in the head features "
                    "and must stay as modules at inference"
                )
    for m in owners:
        m.fold_knocks()
    for m in module.modules():
        if hasattr(getattr(m, "cfg", None), "with_knock"):  # DecoderLM
            m.cfg = m.cfg.with_knock("none")
        if hasattr(getattr(m, "config", None), "knock"):  # KHAForCausalLM
            m.config.knock, m.config.knock_targets = "none", []
    return module
