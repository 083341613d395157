"""``TrainConfig``: every knob of a training run, loadable from TOML or a preset and overridable from the CLI.

``kha train --config FILE_OR_PRESET --out DIR [--any-field VALUE ...]``: the config file (TOML, top-level
keys = field names) or preset name sets the starting values; command-line flags (parsed by ``tyro`` from
the dataclass) override any field.
"""

from __future__ import annotations

import argparse
import functools
import math
import tomllib
import types
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import tyro

from ..config import PRESETS, ModelConfig, MoEConfig, get_preset
from ..errors import UserError
from ..knock import KNOCK_TYPES, parse_targets
from ..model import check_doc_positions
from .precision import check_precision


@dataclass
class TrainConfig:
    """A training run. Paper recipe defaults: AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, 5 % warmup,
    cosine to 10 % of the peak LR; Muon for the hidden matrices as an option."""

    out: str = "runs/tiny"
    """Run directory: config, metrics.jsonl, checkpoints/, model.safetensors."""
    preset: str = "tiny"
    """Model preset (``kha params`` lists them); its vocabulary is replaced by the tokenizer's."""
    knock: str = "none"
    """Knock type on top of the preset: none, linear, mlp, gate."""
    knock_targets: str | None = None
    """Knock targets, e.g. qkv or v (default: the paper's for the knock type)."""
    model_overrides: Annotated[dict[str, Any] | None, tyro.conf.Suppress] = None
    """Changes to the preset's model, nested like ``kha.config.ModelConfig``, applied before the knock:
    e.g. ``{"attention": {"n_kv_heads": 8}, "n_layers": 6}``. Set in a TOML config (an inline table) or by
    ``kha ablate``; not a command-line flag."""
    data: str = "data/shakespeare"
    """A directory written by ``kha data prepare``."""
    seq_len: int = 128
    doc_mask: bool = False
    """Limit attention to each token's document within a window (block-diagonal causal; documents end at the
    data's ``<|endoftext|>``), in training and validation. Off: windows cut across documents attend across them."""
    doc_positions: str = "restart"
    """With doc_mask: RoPE positions restart at every document (restart, as each document alone) or keep the
    window's index (continue); RoPE sees only position differences, so the two agree up to rounding."""
    batch_size: int = 16
    """Sequences per process per micro-step; the global batch is batch_size x processes x grad_accum."""
    grad_accum: int = 1
    steps: int = 500
    """Optimizer steps."""
    lr: float = 3e-3
    weight_decay: float = 0.1
    decay_knocks: bool = False
    """Apply weight decay to knock matrices too (the same as ``knock_decay = "zero"``, kept for older configs).
    Off by default: decay pulls them toward zero, i.e. away from their identity start, a bias the paper's
    method does not ask for."""
    knock_decay: str = "none"
    """Weight decay of the knocks: none, zero (toward zero, as every other matrix) or identity (toward their
    initial value: ``W <- W - lr * wd * (W - I)`` for the identity-initialised matrices; see kha.train.optim)."""
    optimizer: str = "adamw"
    """adamw, or muon: torch.optim.Muon for the 2-D hidden matrices, AdamW for embeddings, norms, biases, the
    router and MoE experts, at the same LR, weight decay and schedule (see kha.train.optim)."""
    knock_optimizer: str = "adamw"
    """The knocks' optimizer under ``optimizer = "muon"``: adamw (default: the knocks keep the paper's update,
    so a Muon run changes only the base matrices) or muon."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    precision: str = "auto"
    """auto, fp32 or bf16 (autocast over fp32 master weights). auto: bf16 on CUDA, and on CPUs with native
    bf16 matmul where kha's attention kernels cover the model or it is wide enough to gain from bf16,
    else fp32 (see kha.train.precision)."""
    compile: bool = False
    """torch.compile the model for faster steps (what is compiled: ``compile_scope``)."""
    compile_scope: str = "model"
    """What ``--compile`` compiles in one process: model (the whole model with its LM head and loss, one graph)
    or blocks (each block on its own: dynamo compiles the block's code once and every layer reuses it, so
    compilation does not grow with depth; the LM head and loss run eager). Under FSDP always blocks. On a
    2-core CPU, tiny-moe at 12 layers compiled in 0.4x the time with blocks, at the same step time; at its 4
    layers in 0.7x the time, but its steps took 1.18x as long (docs/benchmarks.md, section o)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms for the run: the same config and seed then give the same losses bit
    for bit. On CPUs compiled training otherwise is not (inductor accumulates the embedding's gradient with
    atomic adds); eager CPU training is deterministic either way."""
    keep_freed_memory: bool = True
    """On a CPU (with glibc): keep memory the run frees in the process for its next step, rather than giving it
    back to the system and faulting it in again page by page (steps took 0.78-0.90x the time, docs/benchmarks.md
    section n). The process then holds the memory of its largest step until it ends."""
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    stop_after: int = 0
    """Train in this call only up to this step (0: to ``steps``), then save a checkpoint and end normally; the
    schedule stays that of ``steps``, and ``--resume`` (with a later ``stop_after``, or none) continues the same
    run bit for bit: a run in slices, for a scheduler's time limit or to interleave two runs on one machine."""
    resume: bool = False
    """Continue from the newest intact checkpoint in ``out``."""
    overwrite: bool = False
    """Start afresh in an ``out`` that holds a run, deleting its metrics, checkpoints and final weights first
    (without it, or ``resume``, such an ``out`` is refused)."""
    spike_window: int = 50
    spike_threshold: float = 4.0
    """A loss-spike event starts at a step whose loss exceeds the mean of the last spike_window admitted losses
    (high ones are admitted only after 10 in a row) by more than spike_threshold standard deviations of them,
    and lasts until the loss is back to that mean; events are counted (see kha.train.callbacks.SpikeDetector)."""
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_types({f.name: getattr(self, f.name) for f in fields(self)})
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_batches", "ckpt_every",
                    "keep_checkpoints", "spike_window")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.seed <= MAX_SEED:  # numpy refuses negative seeds; the seed must fit a signed 64-bit integer
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}] (2**63 - 1), got {self.seed!r}")
        if not 0 <= self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be between 0 (train to steps) and steps ({self.steps}), got "
                             f"{self.stop_after}")
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps must be at most {MAX_STEPS:,} (10**9), got {self.steps:,}: warmup alone would "
                             f"take {max(1, round(self.warmup_frac * self.steps)):,} steps, so the learning rate would "
                             "stay near 0 for any run that can finish")
        if not self.out.strip():
            raise ValueError(f"out must name a run folder, got {self.out!r} (it would train into the current "
                             "folder); e.g. --out runs/my-run")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets are {', '.join(PRESETS)}")
        check_doc_positions(self.doc_positions)
        if self.knock not in KNOCK_TYPES:
            raise ValueError(f"unknown knock {self.knock!r}; valid are {', '.join(KNOCK_TYPES)}")
        parse_targets(self.knock, self.knock_targets)
        if self.model_overrides is not None and not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a dict of ModelConfig fields, got {self.model_overrides!r}")
        base_model_config(self)  # unknown override keys, bad shapes or a knock the variant refuses fail here
        check_precision(self.precision)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; valid are auto, cpu, cuda")
        for name, valid in (("knock_decay", KNOCK_DECAYS), ("optimizer", OPTIMIZERS), ("knock_optimizer", OPTIMIZERS),
                            ("compile_scope", COMPILE_SCOPES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid are {', '.join(valid)}")
        if self.decay_knocks and self.knock_decay == "identity":
            raise ValueError("decay_knocks (knock_decay = 'zero') contradicts knock_decay = 'identity'; "
                             "pass only knock_decay")
        if self.knock_optimizer == "muon" and self.optimizer != "muon":
            raise ValueError(f"knock_optimizer = 'muon' needs optimizer = 'muon', not {self.optimizer!r} (under "
                             "AdamW every parameter is AdamW's); pass --optimizer muon, or leave knock_optimizer "
                             "at adamw")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in out, "
                             "overwrite deletes it; pass one of them")
        for name, hint in train_config_hints().items():
            if hint is float:
                interval = FLOAT_RANGES.get(name, "(-inf, inf)")
                if not _in_interval(getattr(self, name), interval):
                    raise ValueError(f"{name} must be a finite number in {interval}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


MAX_SEED = 2**63 - 1
MAX_STEPS = 10**9  # ~30 years of optimizer steps at one per second; beyond it the schedule is meaningless


KNOCK_DECAYS = ("none", "zero", "identity")
COMPILE_SCOPES = ("model", "blocks")
OPTIMIZERS = ("adamw", "muon")
# the interval each float field must lie in ("[" and "]" include the bound); every float must be finite
FLOAT_RANGES = {"lr": "(0, inf)", "grad_clip": "(0, inf)", "spike_threshold": "(0, inf)", "weight_decay": "[0, inf)",
                "warmup_frac": "[0, 1)", "min_lr_frac": "[0, 1]", "beta1": "[0, 1)", "beta2": "[0, 1)"}


def _in_interval(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def _is_a(value, hint) -> bool:
    """``value`` fits type ``hint`` strictly: a bool is no int, an int is a float, a float is no int."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_is_a(value, h) for h in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if hint in (int, float):
        return not isinstance(value, bool) and isinstance(value, int if hint is int else (int, float))
    return isinstance(value, origin or hint)


def _type_name(hint) -> str:
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string",
             dict: "a table", type(None): "none"}
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(h) for h in get_args(hint))
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    return names.get(get_origin(hint) or hint, getattr(hint, "__name__", str(hint)))


@functools.cache
def train_config_hints() -> dict[str, Any]:
    """``TrainConfig``'s field types, resolved once (the annotations are strings under ``from __future__``)."""
    return get_type_hints(TrainConfig)


def check_types(values: dict) -> None:
    """Every value has its ``TrainConfig`` field's type (``decay_knocks = "no"`` is no boolean)."""
    hints = train_config_hints()
    for key, value in values.items():
        if key in hints and not _is_a(value, hints[key]):
            raise UserError(f"{key} = {value!r} is not {_type_name(hints[key])}")


def check_resume_steps(target_steps: int, checkpoint_step: int, stop_after: int = 0) -> None:
    """Resuming with ``steps`` (or ``stop_after``) below the checkpoint's step would train nothing and look like
    success: refuse it."""
    if target_steps < checkpoint_step:
        raise UserError(f"--steps {target_steps} is below the checkpoint's step {checkpoint_step}: nothing would be "
                        f"trained; pass --steps above {checkpoint_step} to continue, or another --out to start anew")
    if 0 < stop_after <= checkpoint_step < target_steps:
        raise UserError(f"--stop-after {stop_after} is not after the checkpoint's step {checkpoint_step}: nothing "
                        f"would be trained; pass --stop-after above {checkpoint_step}, or 0 to train to --steps "
                        f"{target_steps}")


# Fields a run keeps for its whole life: resuming onto another value would change what it learns mid-run (the
# optimizer's groups and state, or the attention mask), so a resume that asks for one is refused.
RESUME_FIXED = ("doc_mask", "doc_positions", "optimizer", "knock_optimizer", "knock_decay")


def _fixed_value(config: dict, key: str):
    """``config[key]`` (its default when absent); ``knock_decay`` as in effect (``decay_knocks`` means "zero")."""
    default = TrainConfig.__dataclass_fields__[key].default
    if key == "knock_decay" and config.get("decay_knocks", False):
        return "zero"
    return config.get(key, default)


def check_resume_fixed(started: dict, cfg: TrainConfig) -> None:
    """Refuse a resume whose :data:`RESUME_FIXED` settings differ from those the run started with (``started``:
    its ``train_config.json``; a field it lacks had its default). ``doc_positions`` counts only with the mask."""
    now = cfg.to_dict()
    for key in RESUME_FIXED:
        if key == "doc_positions" and not cfg.doc_mask:
            continue
        before, after = _fixed_value(started, key), _fixed_value(now, key)
        if before != after:
            flag = (f"--{'' if before else 'no-'}doc-mask" if key == "doc_mask"
                    else f"--{key.replace('_', '-')} {before}")
            raise UserError(f"this run trained with {key}={before!r}, not {after!r}: pass {flag} to resume it, or "
                            "another --out to start a new run")


def apply_overrides(cfg, overrides: dict):
    """A copy of config dataclass ``cfg`` with the fields named in ``overrides`` replaced; a dict value for a
    nested config (``attention``, ``moe``) changes only the fields it names (``moe``: a dict makes an MoE
    model of a dense preset, ``None`` a dense one of an MoE preset)."""
    valid = {f.name for f in fields(cfg)}
    changes = {}
    for key, value in overrides.items():
        if key not in valid:
            raise ValueError(f"unknown model override {key!r} for {type(cfg).__name__}; "
                             f"valid are {', '.join(sorted(valid))}")
        current = getattr(cfg, key)
        if isinstance(value, dict) and is_dataclass(current):
            value = apply_overrides(current, value)
        elif isinstance(value, dict) and key == "moe":
            try:
                value = MoEConfig(**value)
            except TypeError as err:  # an unknown or a missing field
                raise ValueError(f"model override moe = {value!r}: {err}; its fields are "
                                 f"{', '.join(f.name for f in fields(MoEConfig))}") from err
        elif is_dataclass(current) or (key == "moe" and value is not None):
            raise ValueError(f"model override {key} = {value!r} is not a table of "
                             f"{'MoEConfig' if key == 'moe' else type(current).__name__} fields"
                             f"{' (or none, for a dense FFN)' if key == 'moe' else ''}")
        changes[key] = value
    return replace(cfg, **changes)


def base_model_config(cfg: TrainConfig) -> ModelConfig:
    """The run's model before the tokenizer sets its vocabulary: preset -> ``model_overrides`` -> knock."""
    model_cfg = get_preset(cfg.preset)
    if cfg.model_overrides:
        model_cfg = apply_overrides(model_cfg, cfg.model_overrides)
    return model_cfg.with_knock(cfg.knock, cfg.knock_targets)


def load_config(source: str) -> TrainConfig:
    """A TOML file (top-level keys = ``TrainConfig`` fields) or a model preset name."""
    path = Path(source)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise UserError(f"config file {source!r} not found" if not path.exists() else f"{source} is not a file")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{source}: not valid TOML: {err}") from err
        valid = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise UserError(f"unknown key(s) {unknown} in {source}; valid keys are {', '.join(sorted(valid))}")
        try:
            return TrainConfig(**values)  # wrong types and bad values: a message that starts with the file
        except ValueError as err:
            raise UserError(f"{source}: {err}") from err
    if source in PRESETS:
        return TrainConfig(preset=source)
    raise ValueError(f"--config {source!r} is neither a TOML file nor a preset; presets are {', '.join(PRESETS)}")


def parse_train_args(argv: list[str]) -> TrainConfig:
    """``--config FILE_OR_PRESET`` picks the starting values; every other flag overrides one field."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    start = load_config(known.config) if known.config else TrainConfig()
    return tyro.cli(TrainConfig, default=start, args=rest, prog="kha train --config FILE_OR_PRESET",
                    description="Train a baseline or KHA model. Flags override the config's fields.")
