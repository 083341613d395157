"""The optimizer and its learning-rate schedule (5 % linear warmup, cosine to 10 %, for every parameter group).

- ``optimizer = "adamw"``: AdamW with the paper's recipe for every parameter.
- ``optimizer = "muon"``: ``torch.optim.Muon`` (PyTorch 2.9+) for the 2-D hidden matrices (attention and
  dense-FFN projections), AdamW for the rest: embeddings (tied: also the LM head), norms, biases, the MoE
  router, and the MoE experts' 3-D weights (torch's Muon takes 2-D matrices only; flattening the experts
  into one matrix would orthogonalise them jointly). Muon runs with ``adjust_lr_fn="match_rms_adamw"``
  (Liu et al. 2025, "Muon is Scalable for LLM Training": the update scaled by ``0.2 * sqrt(max(A, B))`` has
  AdamW's RMS), so both share one LR, weight decay and schedule; momentum 0.95 with Nesterov and 5
  Newton-Schulz steps as in Keller Jordan's Muon. The knocks follow ``knock_optimizer``.
- Knock weight decay (``knock_decay``): ``none`` (the default), ``zero`` (ordinary decay, as every other
  matrix) or ``identity``: decay toward the knock's initial value, ``W <- W - lr * wd * (W - I)`` for the
  identity-initialised matrices (``W_gate``, initialised to zero, decays toward zero as usual). The optimizer
  itself decays nothing in that group; :class:`Optimizers` applies it before each step, in the place where
  AdamW and Muon apply their own decoupled decay (before the update), so the fused AdamW kernel stays usable.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError
from .config import TrainConfig

# Keller Jordan's Muon (and torch.optim.Muon's defaults): momentum 0.95 with Nesterov, 5 Newton-Schulz steps.
MUON_MOMENTUM = 0.95
MUON_NS_STEPS = 5
MUON_ADJUST_LR = "match_rms_adamw"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup to ``lr``, then cosine to ``min_lr_frac*lr``."""
    warmup = max(1, round(cfg.warmup_frac * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup - 1))
    floor = cfg.min_lr_frac * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def knock_decay(cfg: TrainConfig) -> str:
    """The run's knock decay: ``knock_decay``, with the older ``decay_knocks = true`` meaning ``"zero"``."""
    return "zero" if cfg.decay_knocks else cfg.knock_decay


def _adamw_only(model: nn.Module) -> set[int]:
    """Ids of the 2-D parameters Muon leaves to AdamW: embeddings, the LM head and the MoE router."""
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.split(".")[-1] in ("lm_head", "router"):
            found.update(id(p) for p in module.parameters(recurse=False))
    return found


def _identity_init(model: nn.Module) -> set[int]:
    """Ids of the knock matrices initialised to the identity (each knock class names them)."""
    return {id(getattr(m, n)) for m in model.modules() for n in getattr(m, "identity_init", ())}


def param_groups(model: nn.Module, cfg: TrainConfig) -> dict[tuple[str, str], list[nn.Parameter]]:
    """Every trainable parameter in exactly one ``(optimizer, decay)`` bucket: optimizer ``adamw`` or ``muon``,
    decay ``decay`` (the optimizer's decoupled decay), ``none`` or ``identity`` (toward I, see the module
    docstring). Matrices decay; norms, biases and, by default, knocks do not."""
    buckets = {(o, d): [] for o in ("adamw", "muon") for d in ("decay", "none", "identity")}
    muon = cfg.optimizer == "muon"
    adamw_only, identity = _adamw_only(model), _identity_init(model)
    mode = knock_decay(cfg)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".knocks." in name:
            opt = "muon" if muon and cfg.knock_optimizer == "muon" else "adamw"
            decay = {"none": "none", "zero": "decay"}.get(mode, "identity" if id(param) in identity else "decay")
        else:
            opt = "muon" if muon and param.dim() == 2 and id(param) not in adamw_only else "adamw"
            decay = "decay" if param.dim() >= 2 else "none"
        buckets[opt, decay].append(param)
    return buckets


class Optimizers:
    """The run's optimizers stepped as one: AdamW, and Muon when ``optimizer = "muon"``.

    ``param_groups`` lists the groups of both (the loop sets their LR). Iterating gives the torch optimizers:
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` / ``set_state_dict`` accept an iterable of
    optimizers and merge their states (keyed by parameter name), which is how checkpoints save and restore
    both, hyperparameters and Muon's momentum buffers included. A group with ``identity_decay`` (its weight
    decay) is decayed toward the identity here, before the optimizers step.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self._centres: dict[int, torch.Tensor] = {}

    def __iter__(self):
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def _centre(self, p: torch.Tensor) -> torch.Tensor:
        if id(p) not in self._centres:
            eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
            if hasattr(p, "device_mesh"):  # an FSDP2 shard: the matching rows of I
                from torch.distributed.tensor import distribute_tensor

                eye = distribute_tensor(eye, p.device_mesh, p.placements)
            self._centres[id(p)] = eye
        return self._centres[id(p)]

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            if group.get("identity_decay"):
                for p in group["params"]:
                    p.sub_(p - self._centre(p), alpha=group["lr"] * group["identity_decay"])
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def _groups(buckets: dict, opt: str, wd: float, keep_empty: bool) -> list[dict]:
    groups = [{"params": buckets[opt, "decay"], "weight_decay": wd}, {"params": buckets[opt, "none"],
                                                                     "weight_decay": 0.0}]
    groups = [g for g in groups if keep_empty or g["params"]]
    if buckets[opt, "identity"]:
        groups.append({"params": buckets[opt, "identity"], "weight_decay": 0.0, "identity_decay": wd})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Optimizers:
    """AdamW (the fused kernel for plain tensors, the default for FSDP's DTensors), plus Muon under
    ``optimizer = "muon"``. AdamW's groups: decayed, not decayed (both always, as runs have always saved them),
    then the identity-decayed knocks if any."""
    buckets = param_groups(model, cfg)
    lr = lr_at(0, cfg)
    params = [p for ps in buckets.values() for p in ps]
    plain = all(type(p) is torch.Tensor or type(p) is nn.Parameter for p in params)
    adamw = torch.optim.AdamW(_groups(buckets, "adamw", cfg.weight_decay, keep_empty=True), lr=lr,
                              betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=plain or None)
    if cfg.optimizer != "muon":
        return Optimizers([adamw])
    muon_class = getattr(torch.optim, "Muon", None)
    if muon_class is None:
        raise UserError(f"optimizer = 'muon' needs torch.optim.Muon (PyTorch 2.9 or newer); this is torch "
                        f"{torch.__version__}: upgrade torch, or use optimizer = 'adamw'")
    if not plain:
        # measured: on 2 gloo processes, torch 2.13's Muon steps FSDP2's row-sharded DTensors without an error,
        # but its update differs from the one-process update by ~17 % of the update's largest entry
        raise UserError("optimizer = 'muon' is not supported under FSDP (more than one process): torch.optim.Muon "
                        "orthogonalises whole matrices, and on FSDP2's sharded (DTensor) parameters its update "
                        "differs from the one-process update; train Muon in one process, or use optimizer = 'adamw'")
    muon = muon_class(_groups(buckets, "muon", cfg.weight_decay, keep_empty=False), lr=lr,
                      weight_decay=cfg.weight_decay, momentum=MUON_MOMENTUM, nesterov=True, ns_steps=MUON_NS_STEPS,
                      adjust_lr_fn=MUON_ADJUST_LR)
    return Optimizers([adamw, muon])


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """``clip_grad_norm_``'s clipping, returning the total gradient norm (across processes under FSDP). Its
    scaling is skipped where its factor would be 1 (norm below ``max_norm``): the same gradients, without a
    pass over all of them (about 7 ms a step at the 32.5M benchmark shape on CPU)."""
    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    full = total.full_tensor() if hasattr(total, "full_tensor") else total
    if not (max_norm / (full + 1e-6) >= 1.0):  # clip_grads_with_norm_'s factor, in its precision (NaN: scale)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return full.item()
