"""Knocking-heads transforms: the paper's contribution (Zhou et al., 2025, section 3).

One transform per target (q, k or v), shared by every head of that target and applied to the last
(feature) dimension of a ``(..., heads, head_dim)`` tensor, so the gradient of its parameters gathers
every head while heads never exchange features in the forward pass.

- ``linear``: ``x @ T`` (eq. 5-7), ``T`` initialised to the identity; foldable into the projection (eq. 8).
- ``mlp``:    ``2 * ((x @ W_up) * sigmoid(x @ W_gate)) @ W_down`` (eq. 9); ``W_up``, ``W_down`` identity,
  ``W_gate`` zero, so ``2 * sigmoid(0) = 1`` and the transform starts as the identity.
- ``gate``:   ``2 * x * sigmoid(x @ W_gate)`` (the Table 2 ablation), ``W_gate`` zero.

Forms (``AttentionConfig.knock_form``; the same function, different rounding):

- ``"plain"``: the formulas above as written, each matrix cast to the activations' dtype: the reference.
  Under bf16 autocast this loses part of a knock's deviation from the identity, since bf16 rounds entries
  near 1 to multiples of 2^-8 below 1 and 2^-7 above it (an AdamW step of ~LR on the diagonal is invisible
  until it crosses a rounding step).
- ``"fused"`` (default): the identity-initialised matrices enter the bf16 products only through ``W - I``,
  formed in fp32, each sum inside the product's accumulation. KHA-Linear runs folded into its projection,
  ``x (W_proj T)`` (one matmul; the folded weight's entries are not near 1), or, when the fold would cost
  more than the knock (fewer rows than ``FOLD_ROWS_PER_INPUT`` times the projection's input width, e.g.
  decoding), ``y + y (T - I)``;
  KHA-MLP runs ``u = y + y (W_up - I)``, then ``h + h (W_down - I)`` with
  ``h = 2 u sigmoid(y W_gate) = u + u tanh(y W_gate / 2)``, ``y (W_up - I)`` and ``y W_gate / 2`` coming from
  one product of ``y`` with both matrices side by side, the other sums inside one ``addmm`` or ``addcmul``:
  a gate near 1 kept as its deviation from 1 (bf16 would round ``sigmoid`` near 0.5 to a multiple of 2^-9);
  the gate knock likewise. In bf16 training on a CPU with AVX512-BF16 both paths run on :mod:`kha.cpu_kernels`
  (one pass each way; the fold in the pass over the weight that autocast's cast would make), the same function
  rounded once more finely (u, h and the gate in fp32).

Parameters are plain ``nn.Parameter`` matrices used as ``x @ W`` (input dim first), never ``nn.Linear``,
so generic ``nn.Linear`` re-initialisers leave them alone. Their initialisation draws no random numbers,
so a knocked model built under a seed has the same base weights as the baseline built under that seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

KNOCK_TYPES = ("none", "linear", "mlp", "gate")
KNOCK_TARGETS = ("q", "k", "v")
# The paper's defaults: KHA-Linear on Q, K and V; KHA-MLP on V (gate, an ablation, on V as in Table 2).
DEFAULT_TARGETS = {"none": (), "linear": ("q", "k", "v"), "mlp": ("v",), "gate": ("v",)}
# Square head_dim x head_dim matrices each knock type owns (for parameter and FLOP accounting).
MATRICES_PER_KNOCK = {"none": 0, "linear": 1, "mlp": 3, "gate": 1}
KNOCK_FORMS = ("fused", "plain")


def check_form(form: str) -> None:
    if form not in KNOCK_FORMS:
        raise ValueError(f"unknown knock_form {form!r}; valid are {', '.join(KNOCK_FORMS)} (fused: bf16-robust "
                         "and faster, the default; plain: the formulas as written, the reference)")


# KHA-Linear folds into its projection when the rows (tokens x batch) are at least this many times the projection's
# input width: the fold's cost, heads x head_dim^2 x d_in per pass, does not grow with the batch, while the knock's,
# rows x heads x head_dim^2, does, so from 1x the fold does fewer FLOPs. Measured (benchmarks/knock_forms.py, whole
# compiled bf16 step, 1,024 rows into 512 features, docs/benchmarks.md section j): on an AMX CPU folded 1.024-1.029x
# the baseline's step against 1.053x for the residual form, in two runs; decoding (a few rows) stays residual.
FOLD_ROWS_PER_INPUT = 1


def _minus_identity(w: torch.Tensor) -> torch.Tensor:
    """``w - I`` in ``w``'s dtype (fp32 master weights): small entries, exact in bf16 up to its relative precision."""
    return w - torch.eye(w.shape[0], dtype=w.dtype, device=w.device)


def _plus_product(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x + x @ delta`` over the last dimension, as one ``addmm`` (the sum inside the product's accumulation)."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.addmm(flat, flat, delta.to(x.dtype)).view(x.shape[:-1] + delta.shape[-1:])


def folded(weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor, dim: int):
    """The weight and bias of ``x -> (x W^T + b) T`` per head of width ``dim`` (eq. 8), as one linear layer.

    ``weight`` is ``(heads * dim, d)``; head ``i``'s rows ``W_i`` become ``T^T W_i = W_i + (T - I)^T W_i``, its bias
    ``b_i T``. The sum runs inside one ``baddbmm``'s accumulation, rounded once, in the dtype a linear layer computes
    in here (autocast's, else the weight's): ``T`` enters only as ``T - I`` (small entries, kept by bf16 to its
    relative precision) and the folded entries are not near 1, so the knock's small deviation is not rounded away,
    and under autocast the folded weight is already in the dtype ``F.linear`` uses (no fp32 pass over the weight).
    """
    delta = _minus_identity(t).t()
    heads = weight.unflatten(0, (-1, dim))
    w = torch.baddbmm(heads, delta.expand(heads.shape[0], -1, -1), heads).flatten(0, 1)
    if bias is None:
        return w, None
    return w, bias + (bias.unflatten(0, (-1, dim)) @ delta.t().to(bias.dtype)).flatten().to(bias.dtype)


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


def _gated(value: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor) -> torch.Tensor:
    """``2 value sigmoid(x @ w_gate)`` as ``value + value tanh(x @ (w_gate / 2))``: the same function, but the
    gate's small deviation from 1 is not rounded away (bf16 spaces values near 0.5 by 2^-9). The halving is exact
    in the weight, and the sum runs inside one ``addcmul``."""
    return torch.addcmul(value, value, torch.tanh(x @ (0.5 * w_gate).to(x.dtype)))


class Knock(nn.Module):
    """A knock on one target: ``forward`` is the plain form, ``residual`` the fused one (module docstring);
    :meth:`project` is how the attention applies it to a head projection."""

    foldable = False
    # this knock's W_up, W_gate and W_down (attribute names; None where it has none), as kha.cpu_kernels.knock
    # takes them
    kernel_matrices: tuple[str | None, str | None, str | None] = (None, None, None)
    kernels = True  # whether the fused form may run on kha's CPU kernels (benchmarks time torch's ops beside them)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The fused form: on kha's CPU kernel where it applies (bf16 training on a CPU with AVX512-BF16: one pass
        each way), else through torch's ops (:meth:`residual_ops`)."""
        matrices = [getattr(self, name) if name else None for name in self.kernel_matrices]
        if self.kernels and cpu_kernels.knock_applies(x, *(w for w in matrices if w is not None)):
            return cpu_kernels.knock(x, *matrices)
        return self.residual_ops(x)

    def residual_ops(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project(self, proj: nn.Linear, x: torch.Tensor, dim: int, form: str) -> torch.Tensor:
        """``proj(x)`` as ``(..., heads, dim)``, then this knock in ``form``."""
        y = proj(x).unflatten(-1, (-1, dim))
        return self(y) if form == "plain" else self.residual(y)


class LinearKnock(Knock):
    """KHA-Linear: ``x @ T``, ``T`` identity at init."""

    foldable = True
    kernel_matrices = ("weight", None, None)
    identity_init = ("weight",)  # the parameters initialised to the identity (the rest start at zero)
    fold_rows_per_input: float | None = None  # this knock's own FOLD_ROWS_PER_INPUT (benchmarks compare both forms)

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype)

    def residual_ops(self, x: torch.Tensor) -> torch.Tensor:
        return _plus_product(x, _minus_identity(self.weight))

    def project(self, proj: nn.Linear, x: torch.Tensor, dim: int, form: str) -> torch.Tensor:
        if form == "plain":
            return super().project(proj, x, dim, form)
        threshold = FOLD_ROWS_PER_INPUT if self.fold_rows_per_input is None else self.fold_rows_per_input
        if x.numel() < threshold * x.shape[-1] * proj.in_features:
            return self.residual(proj(x).unflatten(-1, (-1, dim)))
        if self.kernels and proj.bias is None and cpu_kernels.fold_applies(proj.weight, self.weight):
            return F.linear(x, cpu_kernels.fold(proj.weight, self.weight)).unflatten(-1, (-1, dim))
        return F.linear(x, *folded(proj.weight, proj.bias, self.weight, dim)).unflatten(-1, (-1, dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.weight.shape[0]))


class MLPKnock(Knock):
    """KHA-MLP (eq. 9): ``2 * ((x @ W_up) * sigmoid(x @ W_gate)) @ W_down``; identity at init."""

    identity_init = ("w_up", "w_down")
    kernel_matrices = ("w_up", "w_gate", "w_down")

    def __init__(self, head_dim: int):
        super().__init__()
        self.w_up = nn.Parameter(torch.eye(head_dim))
        self.w_gate = nn.Parameter(torch.zeros(head_dim, head_dim))
        self.w_down = nn.Parameter(torch.eye(head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        hidden = (x @ self.w_up.to(dt)) * torch.sigmoid(x @ self.w_gate.to(dt))
        return 2.0 * (hidden @ self.w_down.to(dt))

    def residual_ops(self, x: torch.Tensor) -> torch.Tensor:
        # W_up - I and W_gate / 2 side by side: one matmul where the plain form has two (one fewer small product
        # forward and two backward; the knock costs per product, not per FLOP)
        flat = x.reshape(-1, x.shape[-1])
        both = torch.cat([_minus_identity(self.w_up), 0.5 * self.w_gate], dim=1).to(x.dtype)
        up_delta, gate = (flat @ both).split(self.w_up.shape[1], dim=-1)
        up = flat + up_delta
        hidden = torch.addcmul(up, up, torch.tanh(gate))
        return _plus_product(hidden, _minus_identity(self.w_down)).view(x.shape[:-1] + self.w_down.shape[-1:])

    def reset_parameters(self) -> None:
        with torch.no_grad():
            n = self.w_up.shape[0]
            self.w_up.copy_(torch.eye(n))
            self.w_gate.zero_()
            self.w_down.copy_(torch.eye(n))


class GateKnock(Knock):
    """Gate-only knock (Table 2 ablation, known to hurt): ``2 * x * sigmoid(x @ W_gate)``; identity at init."""

    identity_init = ()
    kernel_matrices = (None, "w_gate", None)

    def __init__(self, head_dim: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(head_dim, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x * torch.sigmoid(x @ self.w_gate.to(x.dtype))

    def residual_ops(self, x: torch.Tensor) -> torch.Tensor:
        return _gated(x, x, self.w_gate)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.w_gate.zero_()


KNOCK_CLASSES = {"linear": LinearKnock, "mlp": MLPKnock, "gate": GateKnock}


def make_knocks(knock: str, targets: tuple[str, ...], head_dim: int) -> nn.ModuleDict:
    """One shared knock module per target, keyed ``"q"``, ``"k"``, ``"v"``."""
    if knock == "none":
        return nn.ModuleDict()
    return nn.ModuleDict({t: KNOCK_CLASSES[knock](head_dim) for t in targets})


def fold_into_linear(proj: nn.Linear, knock: LinearKnock, head_dim: int) -> None:
    """Absorb ``T`` into a head projection in place (eq. 8).

    ``proj`` maps to ``heads * head_dim`` features; head ``i``'s rows ``W_i`` (``head_dim x d``) give
    ``y_i = x W_i^T + b_i``, so ``y_i T = x (T^T W_i)^T + b_i T``.
    """
    with torch.no_grad(), torch.autocast(proj.weight.device.type, enabled=False):  # stored weights keep their dtype
        weight, bias = folded(proj.weight, proj.bias, knock.weight, head_dim)
        proj.weight.copy_(weight)
        if bias is not None:
            proj.bias.copy_(bias)


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
