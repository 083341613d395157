"""Tables with honest statistics for an ablation grid (``kha report DIR`` / ``kha ablate ... --report``).

- :func:`t_quantile`: Student's t quantile, exact for integer degrees of freedom (the closed-form t CDF
  of Abramowitz & Stegun 26.7.3-4, inverted by bisection); no scipy needed.
- :func:`chi2_quantile` (the same for chi-square, closed-form CDF) and :func:`sd_upper_bound`: how large the
  true sd may be, given few seeds; the seeds table plans with it as well as with the measured sd.
- :func:`summarize`: n, mean, sample sd and the t-based confidence interval of the mean.
- :func:`paired_delta`: the same for per-seed differences treatment - baseline (seeds both finished).
- :func:`paired_sd_ratio`: whether an arm's final loss varies less over seeds than its baseline's (Pitman-Morgan).
- :func:`signed_rank_interval`: a paired ΔL's centre and interval without assuming normality (Hodges-Lehmann
  estimate, exact Wilcoxon signed-rank interval).
- :func:`load_grid`: a grid directory's ``grid.json`` and, per variant and seed, the final validation loss
  and the spike count of each run (only finished runs carry a loss).
- :class:`GridResults`: a grid's results by variant, group and arm; ΔL of each arm against its group's baseline.
- :func:`grid_report` / :func:`write_report`: ``DIR/report.md``, tables shaped like the paper's Tables 1, 2,
  3 and 5 (cells ``mean ± sd [95 % CI]``, ΔL paired), spike counts, seeds, and every per-seed loss.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .. import cpu_kernels, safe_io
from ..errors import UserError, read_json
from ..train.callbacks import read_metrics, spike_event_steps

# ------------------------------------------------------------------------------------------ statistics


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom (A&S 26.7.3 odd, 26.7.4 even), t >= 0."""
    theta = math.atan2(t, math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 2 the last power
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= (k - 1) / k * c2
            total += term
        return 2 / math.pi * (theta + s * total)
    term = total = 1.0  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df - 2 the last power
    for k in range(2, df - 1, 2):
        term *= (k - 1) / k * c2
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df`` >= 1 (``t_quantile(0.975, 2)`` = 4.3027)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    target = 2 * p - 1  # P(|T| <= t)
    lo, hi = 0.0, 1.0
    while _t_two_sided(hi, df) < target:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    """``n`` values: mean, sample sd (n - 1) and the t confidence interval of the mean (None when n < 2)."""

    n: int
    mean: float
    sd: float | None
    lo: float | None
    hi: float | None

    @property
    def excludes_zero(self) -> bool:
        return self.lo is not None and (self.lo > 0 or self.hi < 0)


def summarize(values, level: float = 0.95) -> Summary | None:
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n < 2:
        return Summary(1, mean, None, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def chi2_cdf(x: float, df: int) -> float:
    """P(X <= x) for chi-square with integer ``df`` >= 1, in closed form (A&S 26.4.4 odd, 26.4.5 even)."""
    if x <= 0:
        return 0.0
    h = x / 2
    if df % 2 == 0:  # 1 - e^-h (1 + h + h^2/2! + ... + h^(df/2 - 1)/(df/2 - 1)!)
        term = total = 1.0
        for j in range(1, df // 2):
            term *= h / j
            total += term
        return max(0.0, 1 - math.exp(-h) * total)
    # odd: erf(sqrt h) - e^-h (h^(1/2)/Gamma(3/2) + h^(3/2)/Gamma(5/2) + ...), (df - 2)/2 the last power
    term = math.sqrt(h) / math.gamma(1.5)
    total = 0.0
    for j in range(1, (df - 1) // 2 + 1):
        total += term
        term *= h / (j + 0.5)
    return min(1.0, max(0.0, math.erf(math.sqrt(h)) - math.exp(-h) * total))


def chi2_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of chi-square with integer ``df`` >= 1 (``chi2_quantile(0.1, 2)`` = 0.2107)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    lo, hi = 0.0, float(df)
    while chi2_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_cdf(mid, df) < p else (lo, mid)
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2


def sd_upper_bound(sd: float, n: int, level: float = 0.9) -> float:
    """One-sided ``level`` upper confidence bound of the true sd, from a sample sd of ``n`` normal values:
    sd sqrt((n - 1) / chi2_{1 - level}(n - 1)). With 3 seeds it is 3.1 x the sample sd (at 0.9), with 18 1.3 x."""
    return sd * math.sqrt((n - 1) / chi2_quantile(1 - level, n - 1))


MOST_SEEDS = 10_000  # the search's limit: beyond it an effect is out of reach of seeds alone


def seeds_for_half_width(sd: float, half_width: float, level: float = 0.95, most: int = MOST_SEEDS) -> int | None:
    """The fewest seeds ``n`` (>= 2) whose t interval of a mean, with this sd, has at most ``half_width``
    (``t(n - 1) * sd / sqrt(n)``); None beyond ``most``. Planning arithmetic: it assumes the sd stays as measured."""
    if not (math.isfinite(sd) and sd >= 0 and half_width > 0):
        return None
    q = (1 + level) / 2

    def fits(n: int) -> bool:
        return t_quantile(q, n - 1) * sd / math.sqrt(n) <= half_width

    # the width shrinks with n, and t(n - 1) > z gives n >= (z sd / h)^2: bisect from there
    lo = max(2, math.floor((statistics.NormalDist().inv_cdf(q) * sd / half_width) ** 2))
    if lo > most or not fits(most):
        return None
    hi = most
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


def welch_difference(a, b, level: float = 0.95) -> Summary | None:
    """``mean(a) - mean(b)`` of two independent samples, with Welch's t interval; ``sd`` is the difference's
    standard error. Welch-Satterthwaite degrees of freedom, rounded down (:func:`t_quantile` takes whole ones):
    the interval is slightly wider than with fractional ones. None unless each sample has 2 values."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, va), (mb, vb) = ((statistics.fmean(x), statistics.variance(x) / len(x)) for x in (a, b))
    diff, se = ma - mb, math.sqrt(va + vb)
    if se == 0:
        return Summary(len(a) + len(b), diff, 0.0, diff, diff)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t_quantile((1 + level) / 2, max(1, math.floor(df))) * se
    return Summary(len(a) + len(b), diff, se, diff - half, diff + half)


def paired_sd_ratio(a, b, level: float = 0.95) -> tuple[float, float, float] | None:
    """``sd(a) / sd(b)`` of paired samples (``a[i]``, ``b[i]`` from one seed) with its Pitman-Morgan interval, or
    None below 3 pairs or when ``b`` does not vary.

    The test (Pitman 1939, Morgan 1939): the variance ratio is ``c^2`` exactly when ``a - c b`` and ``a + c b``
    are uncorrelated, and their sample correlation r gives ``t = r sqrt(n - 2) / sqrt(1 - r^2)`` on n - 2 degrees
    of freedom. The interval holds every ratio that test keeps: for variances, ``F (K -+ sqrt(K^2 - 1))`` with
    ``F`` the sample ratio, ``K = 1 + 2 t^2 (1 - r_ab^2) / (n - 2)``; here its square root, in sds."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    n = len(a)
    if n != len(b):
        raise ValueError(f"paired samples of different lengths: {n} and {len(b)}")
    if n < 3 or statistics.variance(b) == 0:
        return None
    va, vb = statistics.variance(a), statistics.variance(b)
    r2 = statistics.covariance(a, b) ** 2 / (va * vb) if va > 0 else 0.0
    t = t_quantile((1 + level) / 2, n - 2)
    k = 1 + 2 * t * t * (1 - r2) / (n - 2)
    f, spread = va / vb, math.sqrt(max(k * k - 1, 0.0))
    return math.sqrt(f), math.sqrt(f * (k - spread)), math.sqrt(f * (k + spread))


def signed_rank_interval(values, level: float = 0.95) -> tuple[float, float, float] | None:
    """The Hodges-Lehmann estimate of the centre of ``values`` (paired differences) and the Wilcoxon signed-rank
    interval around it, or None where no interval reaches ``level`` (fewer than 6 values at 95 %).

    The estimate is the median of the n (n + 1) / 2 Walsh averages ``(x_i + x_j) / 2``, ``i <= j``; the interval
    holds every centre the exact signed-rank test keeps at ``level``: from the (c + 1)-th smallest Walsh average to
    the (c + 1)-th largest, c the largest signed-rank sum with P(W <= c) <= (1 - level) / 2 under the null (the
    2^n sign patterns counted). Its coverage is at least ``level`` for any continuous distribution symmetric about
    its centre, with no normality assumed: a check on the t interval when a few seeds make a long tail. Without
    symmetry it estimates the pseudo-median, and its coverage is no longer exact."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = [float(v) for v in values]
    n = len(x)
    counts = [1]  # counts[w]: sign patterns of the ranks so far whose positive ranks sum to w
    for r in range(1, n + 1):
        counts = [k + (counts[w - r] if w >= r else 0) for w, k in enumerate(counts + [0] * r)]
    cut, tail, c = (1 - level) / 2 * 2 ** n, 0, -1
    while c + 1 < len(counts) and tail + counts[c + 1] <= cut:
        c += 1
        tail += counts[c]
    if c < 0:
        return None
    walsh = sorted((x[i] + x[j]) / 2 for i in range(n) for j in range(i, n))
    return statistics.median(walsh), walsh[c], walsh[-1 - c]


def paired_delta(treatment: dict[int, float], baseline: dict[int, float], level: float = 0.95) -> Summary | None:
    """Summary of ``treatment[s] - baseline[s]`` over the seeds ``s`` both have."""
    seeds = sorted(set(treatment) & set(baseline))
    return summarize([treatment[s] - baseline[s] for s in seeds], level)


# ------------------------------------------------------------------------------------------ grid results


@dataclass
class RunResult:
    seed: int
    val_loss: float | None
    """Final validation loss; None while the run is unfinished."""
    spike_steps: list[int]
    """The step each loss-spike event began at."""
    steps_done: int
    steps: int
    curve: dict[int, float]
    """Validation loss by tokens seen, at every evaluation of the run so far."""
    devices: tuple[str, ...] = ()
    """The devices it trained on, in order (``train_config.json``'s ``trained_on``; empty where not recorded)."""
    setting: str = "not recorded"
    """Devices, precision and kernels together, e.g. "cpu; bf16, kha's AMX attention and kha's elementwise kernels":
    runs of two settings compute the same function with other rounding, which may move their losses by more than
    noise."""

    @property
    def spikes(self) -> int:
        return len(self.spike_steps)


def run_finished(run_dir: Path, records: list[dict], steps: int) -> bool:
    """Whether a run is finished: its metrics reach the last step with its final evaluation, and its
    ``model_config.json`` (written after the final weights, and kept when a study is committed without them)
    exists. The metrics and configs decide, never the weights or checkpoints, so a fresh clone of committed
    results counts the same runs as the machine that trained them; ``kha ablate`` skips exactly these."""
    return (bool(records) and records[-1]["step"] == steps and "val_loss" in records[-1]
            and (Path(run_dir) / "model_config.json").is_file())


def load_run(path: Path) -> RunResult:
    cfg = read_json(path / "train_config.json")
    if not (isinstance(cfg, dict) and all(isinstance(cfg.get(k), int) for k in ("seed", "steps"))):
        raise UserError(f"{path / 'train_config.json'}: not a training config (an object with whole-number seed "
                        "and steps)")
    records = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else []
    done = records[-1]["step"] if records else 0
    finished = run_finished(path, records, cfg["steps"])
    trained_on = cfg.get("trained_on")
    stretches = trained_on if isinstance(trained_on, list) else []
    devices = [safe_io.plain_text(x["device"], f"{path / 'train_config.json'}: device")
               for x in stretches if isinstance(x, dict) and isinstance(x.get("device"), str)]
    devices = tuple(dict.fromkeys(devices))
    recorded = "cpu_kernels" in cfg or "amx_attention" in cfg
    kernels = cpu_kernels.kernels_label(cfg) if recorded else "kernels not recorded"
    precision = cfg.get("resolved_precision")
    if isinstance(precision, str):  # an fp32 run on the machine of a bf16 run is another setting
        kernels = f"{safe_io.plain_text(precision, f'{path}/train_config.json: resolved_precision')}, {kernels}"
    return RunResult(cfg["seed"], records[-1]["val_loss"] if finished else None,
                     spike_event_steps(records), done, cfg["steps"],
                     {r["tokens"]: r["val_loss"] for r in records if "val_loss" in r and "tokens" in r},
                     devices, f"{' then '.join(devices) or 'device not recorded'}; {kernels}")


def read_grid(root: Path) -> dict:
    """``ROOT/grid.json``; a missing, malformed or damaged one is a :class:`UserError` naming it."""
    root = Path(root)
    if not (root / "grid.json").is_file():
        raise UserError(f"{root} holds no grid (no grid.json); run `kha ablate GRID --out {root}` first")
    meta = read_json(safe_io.inside(root / "grid.json", root))
    variants = meta.get("variants") if isinstance(meta, dict) else None
    if not (isinstance(variants, list) and isinstance(meta.get("grid"), str) and isinstance(meta.get("seeds"), list)
            and all(isinstance(v, dict) and "name" in v for v in variants)):
        raise UserError(f"{root / 'grid.json'} is not a grid file written by `kha ablate` (it needs a grid name, "
                        "seeds and a list of variants); restore it, or run the grid again into another --out")
    _check_strings(meta, f"{root / 'grid.json'}:")  # its names end up in report.md and in file names
    for v in variants:
        name = v["name"]
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise UserError(f"{root / 'grid.json'}: variant name {name!r} is not a folder name")
    return meta


def _check_strings(value, where: str) -> None:
    """Every string (key or value) of a JSON tree free of control characters (a newline would add report lines)."""
    if isinstance(value, str):
        safe_io.plain_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, where)
            _check_strings(item, f"{where} {key}")
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, where)


def load_grid(root: Path) -> tuple[dict, dict[str, dict[int, RunResult]]]:
    """``grid.json`` and ``{variant: {seed: RunResult}}`` for every run directory found."""
    root = Path(root)
    meta = read_grid(root)
    results = {}
    for v in meta["variants"]:
        runs = sorted((root / "runs" / v["name"]).glob("seed_*/train_config.json"))
        results[v["name"]] = {r.seed: r for r in (load_run(safe_io.inside(p, root).parent) for p in runs)}
    return meta, results


def final_losses(runs: dict[int, RunResult]) -> dict[int, float]:
    return {s: r.val_loss for s, r in runs.items() if r.val_loss is not None}


# ------------------------------------------------------------------------------------------ formatting


def fmt_summary(s: Summary | None, digits: int = 3, signed: bool = False, mark: bool = False) -> str:
    """``mean ± sd [lo, hi]``; ``*`` after a paired difference whose interval excludes 0."""
    if s is None:
        return "—"
    f = f"{{:{'+' if signed else ''}.{digits}f}}".format
    if s.sd is None:
        return f"{f(s.mean)} (n=1)"
    star = "*" if mark and s.excludes_zero else ""
    return f"{f(s.mean)} ± {s.sd:.{digits}f} [{f(s.lo)}, {f(s.hi)}]{star}"


TOKEN_UNITS = ((1e9, "B", "billions"), (1e6, "M", "millions"), (1e3, "K", "thousands"), (1, "", ""))


def token_unit(tokens: float) -> tuple[float, str, str]:
    """The scale at which a token count reads best: ``(divisor, suffix, word)``, e.g. ``(1e3, "K", "thousands")``
    for 12,800; ``(1, "", "")`` below a thousand."""
    return next(unit for unit in TOKEN_UNITS if abs(tokens) >= unit[0] or unit[0] == 1)


def fmt_tokens(tokens: float) -> str:
    """A token count in K, M or B as fits, four significant digits: 300, 12.8K, 1.5M, 2.048B."""
    scale, suffix, _ = token_unit(tokens)
    return f"{tokens / scale:.4g}{suffix}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class GridResults:
    """A grid directory's results, indexed the way the tables need them."""

    def __init__(self, root: Path, level: float = 0.95, seeds: int | None = None):
        """``seeds``: count only seeds 0..seeds-1 (a design's planned seeds, with later ones left out)."""
        self.root, self.level = Path(root), level
        self.meta, self.results = load_grid(root)
        if seeds is not None:
            self.results = {name: {s: r for s, r in runs.items() if s < seeds} for name, runs in self.results.items()}
            self.meta = {**self.meta, "seeds": [s for s in self.meta["seeds"] if s < seeds]}
        self.variants = self.meta["variants"]
        self.by_name = {v["name"]: v for v in self.variants}
        self.groups: dict[str, dict[str, dict]] = {}
        for v in self.variants:
            self.groups.setdefault(v["group"], {})[v["arm"]] = v

    def losses(self, name: str) -> dict[int, float]:
        return final_losses(self.results.get(name, {}))

    def loss(self, name: str | None) -> str:
        return fmt_summary(summarize(self.losses(name).values(), self.level)) if name else "—"

    def baseline(self, name: str) -> str | None:
        base = self.groups[self.by_name[name]["group"]].get("baseline")
        return base["name"] if base and base["name"] != name else None

    def pairs(self, name: str) -> tuple[list[float], list[float]]:
        """The final losses of ``name`` and of its baseline over the seeds both finished, in seed order (empty
        lists without a baseline)."""
        base = self.baseline(name)
        arm, ref = self.losses(name), self.losses(base) if base else {}
        seeds = sorted(set(arm) & set(ref))
        return [arm[s] for s in seeds], [ref[s] for s in seeds]

    def delta_summary(self, name: str) -> Summary | None:
        base = self.baseline(name)
        return paired_delta(self.losses(name), self.losses(base), self.level) if base else None

    def delta_curve(self, name: str) -> list[tuple[int, Summary]]:
        """Paired ΔL against the baseline at every evaluation point (tokens seen) both runs of a seed reached."""
        base = self.baseline(name)
        if not base:
            return []
        runs, base_runs = self.results.get(name, {}), self.results.get(base, {})
        curves = {s: r.curve for s, r in runs.items()}
        base_curves = {s: r.curve for s, r in base_runs.items()}
        points = sorted({t for s, c in curves.items() for t in c if t in base_curves.get(s, {})})
        return [(t, paired_delta({s: c[t] for s, c in curves.items() if t in c},
                                 {s: c[t] for s, c in base_curves.items() if t in c}, self.level)) for t in points]

    def delta(self, name: str | None) -> str:
        return fmt_summary(self.delta_summary(name), 4, signed=True, mark=True) if name else "—"

    def spikes(self, *names: str | None) -> str:
        return "/".join(str(sum(r.spikes for r in self.results.get(n, {}).values())) if n else "—" for n in names)

    def seeds(self, *names: str | None) -> str:
        """Seeds finished by every named variant (the pairs behind a ΔL)."""
        sets = [set(self.losses(n)) for n in names if n]
        return str(len(set.intersection(*sets))) if sets else "0"

    def arm(self, group: str, arm: str) -> str | None:
        v = self.groups.get(group, {}).get(arm)
        return v["name"] if v else None

    def model_config(self, name: str):
        """The ModelConfig of the variant's first finished run (its ``model_config.json``)."""
        from ..runfiles import model_config_from_dict

        root = self.root / "runs" / name
        for path in sorted(root.glob("seed_*/model_config.json")):
            return model_config_from_dict(read_json(safe_io.inside(path, self.root)))
        return None


def cache_per_token(attn) -> str:
    """Cached numbers per token and layer, as Table 3 prints them (latent + RoPE key for MLA and GTA)."""
    if attn.variant in ("mla", "gla"):
        return f"{attn.kv_lora_rank}+{attn.rope_head_dim}"
    if attn.variant == "gta":
        return f"{attn.n_kv_heads * attn.head_dim}+{attn.head_dim // 2}"
    return str(2 * attn.n_kv_heads * attn.head_dim)


def _params(cfg) -> tuple[str, str]:
    from ..model import count_parameters

    if cfg is None:
        return "—", "—"
    c = count_parameters(cfg)
    return f"{c['activated'] / 1e6:.2f}M", f"{c['total'] / 1e6:.2f}M"


# ------------------------------------------------------------------------------------------ the tables


def table1_md(g: GridResults) -> str:
    groups = list(g.groups)
    header = ["Model"] + [f"{next(iter(g.groups[k].values()))['info']['kv_heads']} KV heads" for k in groups]
    rows = [["Baseline"] + [g.loss(g.arm(k, "baseline")) for k in groups]]
    for arm in ("KHA-MLP", "KHA-Linear"):
        rows.append([arm] + [g.loss(g.arm(k, arm)) for k in groups])
        rows.append(["ΔL (paired)"] + [g.delta(g.arm(k, arm)) for k in groups])
    rows.append(["spikes (base/MLP/Linear)"] + [g.spikes(*(g.arm(k, a) for a in ("baseline", "KHA-MLP", "KHA-Linear")))
                                                for k in groups])
    rows.append(["seeds"] + [g.seeds(*(g.arm(k, a) for a in ("baseline", "KHA-MLP", "KHA-Linear"))) for k in groups])
    return "### Table 1: number of KV heads (GQA, 32 query heads)\n\n" + _md(header, rows)


KNOCK_LABELS = {"none": "-", "linear": "Linear", "mlp": "MLP", "gate": "Gate"}


def table2_md(g: GridResults) -> str:
    rows = []
    for v in g.variants:
        targets = v["knock_targets"] or ""
        marks = ["✓" if t in targets else "-" for t in "qkv"]
        rows.append([KNOCK_LABELS[v["knock"]], *marks, g.loss(v["name"]),
                     g.delta(v["name"]), g.spikes(v["name"]), g.seeds(v["name"], g.baseline(v["name"]))])
    header = ["Type", "Q", "K", "V", "Loss", "ΔL (paired)", "spikes", "seeds"]
    return "### Table 2: knock type x place\n\n" + _md(header, rows)


def table3_md(g: GridResults) -> str:
    rows = []
    for group, arms in g.groups.items():
        base = arms.get("baseline")
        kha = next((v for a, v in arms.items() if a != "baseline"), None)
        cfg = g.model_config(base["name"]) if base else None
        attn = cfg.attention if cfg else None
        rows.append([(base or kha)["info"].get("model", group), attn.head_dim if attn else "—",
                     attn.n_kv_heads if attn else "—", attn.n_heads if attn else "—",
                     cache_per_token(attn) if attn else "—", _params(cfg)[0],
                     g.loss(base and base["name"]), (f"{kha['arm']}: " if kha else "") + g.loss(kha and kha["name"]),
                     g.delta(kha and kha["name"]), g.spikes(base and base["name"], kha and kha["name"]),
                     g.seeds(base and base["name"], kha and kha["name"])])
    header = ["Model", "Head dim", "# KV heads", "# Query heads", "Cache", "Activated params", "Baseline",
              "Knocking-Heads", "ΔL (paired)", "spikes (base/KHA)", "seeds"]
    return "### Table 3: attention variants\n\n" + _md(header, rows)


def table5_md(g: GridResults) -> str:
    rows = []
    for arms in g.groups.values():
        names = [arms[a]["name"] if a in arms else None for a in ("baseline", "KHA-MLP", "KHA-Linear")]
        cfg = g.model_config(names[0]) if names[0] else None
        activated, total = _params(cfg)
        if cfg is None:
            shape = ["—"] * 3
        else:
            ffn = f"{cfg.moe.d_expert}x{cfg.moe.top_k}" if cfg.moe else str(cfg.d_ff)
            shape = [cfg.n_layers, cfg.d_model, ffn]
        kind = next(iter(arms.values()))["info"].get("type", "")
        rows.append([kind, activated, total, *shape, g.loss(names[0]), g.loss(names[1]), g.delta(names[1]),
                     g.loss(names[2]), g.delta(names[2]), g.spikes(*names), g.seeds(*names)])
    header = ["Type", "Activated params", "Total params", "Layers", "Hidden size", "FFN size", "GQA", "KHA-MLP",
              "ΔL MLP (paired)", "KHA-Linear", "ΔL Linear (paired)", "spikes (GQA/MLP/Linear)", "seeds"]
    return "### Table 5: model sizes, MoE and dense\n\n" + _md(header, rows)


def generic_md(g: GridResults) -> str:
    rows = [[v["group"], v["arm"], g.loss(v["name"]), g.delta(v["name"]), g.spikes(v["name"]),
             g.seeds(v["name"], g.baseline(v["name"]))] for v in g.variants]
    return _md(["Group", "Arm", "Loss", "ΔL (paired)", "spikes", "seeds"], rows)


TABLES = {"table1": table1_md, "table2": table2_md, "table3": table3_md, "table5": table5_md}
# Questions a grid asks besides "does each arm beat the baseline": (variant, compared with, what it answers). A side
# may be a pair (a, b), the per-seed a - b: ((a, b), (c, d)) asks whether a - b differs from c - d (an interaction).
CONTRASTS = {"study": (("mlp-v-decay", "mlp-v", "weight decay on the knocks: decayed - not decayed (KHA-MLP v)"),
                       ("mlp-v", "linear-qkv", "the paper's two choices: KHA-MLP on V - KHA-Linear on Q, K, V")),
             "study2": (("mlp-v-identity", "mlp-v", "knocks decayed toward I - not decayed (KHA-MLP v)"),
                        ("mlp-v", "linear-qkv", "the paper's two choices: KHA-MLP on V - KHA-Linear on Q, K, V"),
                        ("fp32-baseline", "baseline", "precision, baseline: fp32 - bf16"),
                        ("fp32-mlp-v", "mlp-v", "precision, KHA-MLP v: fp32 - bf16"),
                        (("fp32-mlp-v", "fp32-baseline"), ("mlp-v", "baseline"),
                         "does KHA-MLP v's ΔL depend on precision: its ΔL in fp32 - its ΔL in bf16")),
             "muon": (("muon-baseline", "adamw-baseline", "optimizer, baseline: Muon - AdamW"),
                      ("muon-mlp-v", "adamw-mlp-v", "optimizer, KHA-MLP v: Muon - AdamW"),
                      (("muon-mlp-v", "muon-baseline"), ("adamw-mlp-v", "adamw-baseline"),
                       "does KHA-MLP v's ΔL depend on the optimizer: its ΔL with Muon - its ΔL with AdamW")),
             "docmask": (("baseline-doc", "baseline", "document mask: masked - unmasked (baseline)"),
                         ("mlp-v-doc", "mlp-v", "document mask: masked - unmasked (KHA-MLP v)"),
                         ("mlp-v-doc", "baseline-doc", "KHA-MLP v - baseline, both document-masked"),
                         (("mlp-v-doc", "baseline-doc"), ("mlp-v", "baseline"),
                          "does KHA-MLP v's ΔL depend on the mask: its ΔL masked - its ΔL unmasked"))}


def _contrast_side(g: GridResults, side) -> tuple[dict[int, float], list[str], str]:
    """A contrast's side: its per-seed losses (a pair: per-seed differences), the variants it reads, its label."""
    if isinstance(side, str):
        return g.losses(side), [side], f"`{side}`"
    a, b = side
    first, second = g.losses(a), g.losses(b)
    return {s: first[s] - second[s] for s in set(first) & set(second)}, [a, b], f"(`{a}` - `{b}`)"


def contrasts_md(g: GridResults) -> str | None:
    """Paired ΔL between two non-baseline arms, or between two arms' ΔLs (:data:`CONTRASTS`), over the seeds every
    variant named finished."""
    rows = []
    for first, second, what in CONTRASTS.get(g.meta["grid"], ()):
        (x, names_x, label_x), (y, names_y, label_y) = (_contrast_side(g, side) for side in (first, second))
        if all(n in g.by_name for n in names_x + names_y):
            rows.append([what, f"{label_x} - {label_y}",
                         fmt_summary(paired_delta(x, y, g.level), 4, signed=True, mark=True),
                         g.seeds(*names_x, *names_y)])
    return _md(["Question", "contrast", "paired ΔL (final)", "seeds"], rows) if rows else None


def crossover(curve: list[tuple[int, Summary]]) -> int | None:
    """The first evaluation point from which on every interval of ΔL lies below 0 (KHA better), else None."""
    first = None
    for tokens, s in curve:
        below = s is not None and s.hi is not None and s.hi < 0
        first = (tokens if first is None else first) if below else None
    return first


PLANNED_HALF_WIDTHS = (0.02, 0.015, 0.01)  # the paper's KHA effects (ΔL -0.010 to -0.024); study v2's target
SD_BOUND_LEVEL = 0.9  # the sd's one-sided upper bound used to say how many seeds it might take


def seeds_needed_md(g: GridResults) -> str | None:
    """Per non-baseline arm: the paired sd of the final ΔL, its upper bound, and the seeds a 95 % interval of
    each half-width in :data:`PLANNED_HALF_WIDTHS` would take at that sd (in parentheses: at the bound)."""
    rows = []
    for v in g.variants:
        s = g.delta_summary(v["name"]) if v["arm"] != "baseline" else None
        if s is not None and s.sd is not None:
            bound = sd_upper_bound(s.sd, s.n, SD_BOUND_LEVEL)
            seeds = [[seeds_for_half_width(sd, h, g.level) for sd in (s.sd, bound)] for h in PLANNED_HALF_WIDTHS]
            cells = ["{} ({})".format(*(f"> {MOST_SEEDS}" if n is None else n for n in pair)) for pair in seeds]
            rows.append([v["name"], str(s.n), f"{s.sd:.4f}", f"{bound:.4f}", f"±{s.hi - s.mean:.4f}", *cells])
    return _md(["Variant", "seeds", "sd of paired ΔL", f"sd, {100 * SD_BOUND_LEVEL:g} % upper bound",
                "interval now",
                *(f"seeds for ±{h}" for h in PLANNED_HALF_WIDTHS)], rows) if rows else None


def spread_md(g: GridResults) -> str | None:
    """Per non-baseline arm: the sd over seeds of its final losses and of its baseline's on the same seeds, and
    their ratio with its interval (:func:`paired_sd_ratio`); None without an arm of 3 pairs."""
    rows = []
    for v in g.variants:
        arm, ref = g.pairs(v["name"])
        ratio = paired_sd_ratio(arm, ref, g.level)
        if ratio is not None:
            star = "*" if not ratio[1] <= 1 <= ratio[2] else ""
            rows.append([v["name"], str(len(arm)), f"{statistics.stdev(arm):.4f}", f"{statistics.stdev(ref):.4f}",
                         f"{ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]{star}"])
    return _md(["Variant", "seeds", "sd of final loss", "its baseline's sd", "sd ratio [interval]"],
               rows) if rows else None


def signed_rank_md(g: GridResults) -> str | None:
    """Per non-baseline arm: the paired ΔL's mean and t interval beside its Hodges-Lehmann estimate and
    signed-rank interval (:func:`signed_rank_interval`), and the pairs below 0; None without an arm of enough
    pairs for that interval."""
    rows = []
    for v in g.variants:
        arm, ref = g.pairs(v["name"])
        deltas = [a - b for a, b in zip(arm, ref, strict=True)]
        found = signed_rank_interval(deltas, g.level)
        if found is not None:
            centre, lo, hi = found
            star = "*" if lo > 0 or hi < 0 else ""
            rows.append([v["name"], str(len(deltas)), g.delta(v["name"]),
                         f"{centre:+.4f} [{lo:+.4f}, {hi:+.4f}]{star}", str(sum(d < 0 for d in deltas))])
    return _md(["Variant", "pairs", "ΔL: mean ± sd [t interval]", "ΔL: Hodges-Lehmann [signed-rank interval]",
                "pairs with ΔL < 0"], rows) if rows else None


def delta_curves_md(g: GridResults) -> str:
    """ΔL against tokens seen: one column per non-baseline arm, one row per evaluation point."""
    curves = {v["name"]: g.delta_curve(v["name"]) for v in g.variants if v["arm"] != "baseline"}
    curves = {name: curve for name, curve in curves.items() if curve}
    if not curves:
        return "(no paired evaluations yet)"
    tokens = sorted({t for curve in curves.values() for t, _ in curve})
    rows = [[fmt_tokens(t)] + [fmt_summary(dict(curve).get(t), 4, signed=True, mark=True)
                               for curve in curves.values()] for t in tokens]
    cross = [crossover(curve) for curve in curves.values()]
    rows.append(["**below 0 from**"] + ["never" if t is None else fmt_tokens(t) for t in cross])
    return _md(["tokens"] + [f"ΔL {name}" for name in curves], rows)


def knocks_md(g: GridResults) -> str | None:
    """How far the final knocks moved from their init: per variant and knock matrix, the mean over layers and
    finished seeds of ``||W - W_0||_F`` and of the diagonal's share of ``|W|`` (kha.analysis.knocks)."""
    from .knocks import final_weights_file, knock_stats, load_knocks

    rows = []
    for v in (v for v in g.variants if v["knock"] != "none"):
        stats: dict[tuple[str, str], list[dict]] = {}
        for seed in g.losses(v["name"]):
            run = g.root / "runs" / v["name"] / f"seed_{seed}"
            if final_weights_file(run) is not None:
                for row in knock_stats(load_knocks(run)):
                    stats.setdefault((row["target"], row["param"]), []).append(row)
        for (target, param), found in stats.items():
            n_seeds = len(found) // len({r["layer"] for r in found})
            rows.append([v["name"], target, param, f"{sum(r['moved'] for r in found) / len(found):.3f}",
                         f"{sum(r['diag_share'] for r in found) / len(found):.3f}", str(n_seeds)])
    if not rows:
        return None
    return _md(["Variant", "target", "matrix", "moved ‖W - W0‖ (mean over layers, seeds)", "diagonal share of abs(W)",
                "seeds"], rows)


def per_seed_md(g: GridResults) -> str:
    seeds = sorted({s for runs in g.results.values() for s in runs})
    rows = []
    for v in g.variants:
        runs = g.results.get(v["name"], {})
        cells = []
        for s in seeds:
            r = runs.get(s)
            cells.append("—" if r is None else f"{r.val_loss:.4f}" if r.val_loss is not None
                         else f"({r.steps_done}/{r.steps} steps)")
        began = "; ".join(f"seed {s}: {', '.join(map(str, runs[s].spike_steps))}" for s in seeds
                          if s in runs and runs[s].spike_steps)
        rows.append([v["name"], *cells, "/".join(str(runs[s].spikes) if s in runs else "—" for s in seeds),
                     began or "none"])
    return _md(["Variant", *[f"seed {s}" for s in seeds], "spikes per seed", "step each spike began"], rows)


def devices_line(g: GridResults) -> str:
    """How many of the grid's runs trained on each device, e.g. ``cpu: 6, NVIDIA H200: 40, not recorded: 2``."""
    counts: dict[str, int] = {}
    for runs in g.results.values():
        for run in runs.values():
            for device in run.devices or ("not recorded",):
                counts[device] = counts.get(device, 0) + 1
    return ", ".join(f"{device}: {n}" for device, n in sorted(counts.items())) or "no runs yet"


def settings_md(g: GridResults) -> str | None:
    """Where the finished runs trained on more than one setting (:attr:`RunResult.setting`): per setting, each
    baseline's loss and each arm's paired ΔL over the pairs trained wholly on it, and each later setting's
    difference from the first (Welch). None when every finished run shares one setting."""
    finished = [(name, r) for name, runs in g.results.items() for r in runs.values() if r.val_loss is not None]
    first_seed: dict[str, int] = {}
    for _, r in finished:
        first_seed[r.setting] = min(first_seed.get(r.setting, r.seed), r.seed)
    settings = sorted(first_seed, key=lambda st: (first_seed[st], st))
    if len(settings) < 2:
        return None

    def values(name: str, setting: str) -> list[float]:
        """The variant's losses (baselines) or paired ΔL (other arms) over its runs and pairs of this setting."""
        runs = g.results.get(name, {})
        base = g.baseline(name)
        if base is None:
            return [r.val_loss for r in runs.values() if r.val_loss is not None and r.setting == setting]
        base_runs = g.results.get(base, {})
        return [r.val_loss - base_runs[s].val_loss for s, r in runs.items()
                if r.val_loss is not None and s in base_runs and base_runs[s].val_loss is not None
                and r.setting == base_runs[s].setting == setting]

    names = [v["name"] for v in g.variants]
    header = ["Setting", "runs"] + [f"`{n}` loss" if g.baseline(n) is None else f"ΔL `{n}`" for n in names]
    rows = []
    for setting in settings:
        cells = []
        for n in names:
            s, is_delta = summarize(values(n, setting), g.level), g.baseline(n) is not None
            n = "" if s is None or s.sd is None else f" (n={s.n})"  # fmt_summary shows a single value's n itself
            cells.append("—" if s is None else f"{fmt_summary(s, 4, signed=is_delta, mark=is_delta)}{n}")
        rows.append([setting, str(sum(r.setting == setting for _, r in finished)), *cells])
    for setting in settings[1:]:
        cells = []
        for n in names:
            d = welch_difference(values(n, setting), values(n, settings[0]), g.level)
            star = "*" if d is not None and d.excludes_zero else ""
            cells.append("—" if d is None else f"{d.mean:+.4f} [{d.lo:+.4f}, {d.hi:+.4f}]{star}")
        if any(c != "—" for c in cells):  # settings with no variant in common (e.g. an fp32 group) compare nothing
            rows.append([f"difference: {setting} - {settings[0]}", "", *cells])
    split = sum(1 for v in g.variants if g.baseline(v["name"]) for s, r in g.results.get(v["name"], {}).items()
                if r.val_loss is not None and (b := g.results.get(g.baseline(v["name"]), {}).get(s)) is not None
                and b.val_loss is not None and b.setting != r.setting)
    note = f"\n\nPairs whose two runs trained on different settings (left out above): {split}." if split else ""
    return _md(header, rows) + note


def grid_report(root: Path, level: float = 0.95, seeds: int | None = None) -> str:
    g = GridResults(root, level, seeds)
    meta, results = g.meta, g.results
    train = meta.get("train", {})
    presets = ", ".join(dict.fromkeys(v.get("preset") or train.get("preset") for v in g.variants))
    n_runs = sum(len(r) for r in results.values())
    n_done = sum(1 for r in results.values() for x in r.values() if x.val_loss is not None)
    pct = f"{100 * level:g} %"
    lines = [
        f"# {meta['grid']}: final validation loss, paired against the baseline",
        "",
        f"Runs: {n_done} finished of {n_runs} found ({len(g.variants)} variants x seeds {meta['seeds']}). "
        f"Each: preset {presets}, {train.get('steps')} steps x {train.get('batch_size')} x "
        f"{train.get('seq_len')} tokens (x grad_accum {train.get('grad_accum')}), lr {train.get('lr')}, "
        f"data {train.get('data')}; validation loss over {train.get('eval_batches')} batches."
        + (f" Seeds 0-{seeds - 1} only (`--seeds {seeds}`): later seeds' runs are left out." if seeds else ""),
        "",
        f"Trained on (runs per device; a run resumed on other hardware is counted under each): {devices_line(g)}.",
        "",
        f"Cells: mean ± sd over seeds [{pct} t confidence interval of the mean]. ΔL (paired): per seed, the "
        "variant's loss minus its baseline's with the same seed (same base weights, same batches); mean ± sd "
        f"of those differences [{pct} t interval]; `*`: the interval excludes 0. Negative ΔL: KHA is better. "
        "spikes: loss-spike events summed over seeds (see kha.train.callbacks.SpikeDetector). seeds: the number of "
        "seeds every compared variant finished.",
        "",
        TABLES.get(meta["grid"], generic_md)(g),
        "",
        "### ΔL against tokens seen (paired, at every evaluation)",
        "",
        "Each cell: the paired ΔL at that point over the seeds both runs reached it (mean ± sd [interval], `*` "
        "when the interval excludes 0). Last row: the first point from which every interval lies below 0.",
        "",
        delta_curves_md(g),
        "",
        "### Every run: final validation loss per seed",
        "",
        per_seed_md(g),
        "",
    ]
    needed = seeds_needed_md(g)
    if needed:
        lines += ["### How many seeds would resolve an effect of the paper's size", "",
                  f"Seeds n such that the {pct} t interval of the final paired ΔL, t(n - 1) x sd / sqrt(n), is no "
                  "wider than ± the half-width, if the paired sd stays what these seeds measured; in parentheses, "
                  f"if it is as large as its one-sided {100 * SD_BOUND_LEVEL:g} % upper confidence bound "
                  "(chi-square, from the same seeds: few seeds measure an sd loosely).", "", needed, ""]
    spread = spread_md(g)
    if spread:
        lines += ["### Spread over seeds: does an arm change how much the final loss depends on the seed", "",
                  "Over the seeds both runs finished: the sd of the arm's final loss and of its baseline's, and "
                  f"their ratio with its {pct} Pitman-Morgan interval (paired: a seed's two runs share base "
                  "weights and batches, so their losses are correlated; `*`: the interval excludes 1). Below 1: "
                  "the arm's losses vary less from seed to seed, and then its ΔL is lowest (KHA gains most) on "
                  "the seeds where the baseline ends worst. The interval assumes normally distributed losses; "
                  "outlying seeds move it.", "", spread, ""]
    ranks = signed_rank_md(g)
    if ranks:
        lines += ["### Without assuming normality: the signed-rank interval of the paired ΔL", "",
                  "The t interval above assumes the paired differences are about normal; a few seeds far out (a "
                  "long tail) move its mean. Beside it: the Hodges-Lehmann estimate (the median of the averages "
                  "of every two differences, each with itself included) and the interval of every centre the "
                  f"exact Wilcoxon signed-rank test keeps at {pct}, which assumes only a distribution symmetric "
                  "about its centre (`*`: it excludes 0). Arms with pairs enough for it (6 at 95 %).", "", ranks, ""]
    settings = settings_md(g)
    if settings:
        lines += ["### By setting: device, precision and kernels", "",
                  "These runs trained on more than one setting (device, precision, and on a CPU in bf16 which "
                  "kernels: `train_config.json`'s `trained_on`, `resolved_precision`, `amx_attention`, "
                  "`cpu_kernels`, `cpu_micro_kernel`). Each setting computes the same function with its own "
                  "rounding. Per setting: each "
                  "baseline's loss and each arm's paired ΔL over the pairs trained wholly on it (n: runs or pairs); "
                  "last: each later setting minus the first, where a variant has runs in both, difference of means "
                  f"with Welch's {pct} interval (`*`: it excludes 0). A difference in "
                  "ΔL means the settings' effects differ, and the pooled ΔL above mixes them.", "", settings, ""]
    contrasts = contrasts_md(g)
    if contrasts:
        lines += ["### Other paired contrasts", "",
                  "The same paired ΔL (same seed: same base weights and batches) between two KHA arms, or between "
                  "two arms' ΔLs (an interaction): negative means the first is better. Each interval stands alone "
                  "(no correction for the several comparisons of this report).", "", contrasts, ""]
    knocks = knocks_md(g)
    if knocks:
        lines += ["### Knocks: how far training moved them from their init", "",
                  "W0 is the identity (W_gate: zero). A diagonal share near 1 means each feature still maps mostly "
                  "to itself; lower shares mean the shared transform mixes features across the head dimension.", "",
                  knocks, ""]
    return "\n".join(lines)


def write_report(root: Path, level: float = 0.95, seeds: int | None = None, out: Path | None = None) -> Path:
    """``out`` (default ``ROOT/report.md``): the report of ``root``, of seeds 0..seeds-1 only if given."""
    if not 0 < level < 1:
        raise UserError(f"--level must be a confidence level in (0, 1), e.g. 0.95; got {level}")
    if seeds is not None and seeds < 1:
        raise UserError(f"--seeds must be a positive number of seeds (seeds 0..N-1); got {seeds}")
    path = Path(out) if out else Path(root) / "report.md"
    safe_io.make_dirs(path.parent)
    return safe_io.write_text(path, grid_report(Path(root), level, seeds))
