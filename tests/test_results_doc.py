"""docs/results.md's study v2 numbers are those of the committed runs (docs/results/study2/runs).

Each per-seed row of the section's tables is checked against the final validation loss in the run's own
metrics.jsonl, read here without kha's loaders; the summary rows against the t intervals of the seeds the
table lists; the statistics the prose of the pairs beyond the plan and the section's heading quote,
recomputed likewise. A row may lag the data (a run committed before its row), never disagree with it."""
import json
import re
from pathlib import Path

import pytest

from kha.analysis.tables import (
    paired_sd_ratio,
    sd_upper_bound,
    seeds_for_half_width,
    signed_rank_interval,
    summarize,
    welch_difference,
)

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "results" / "study2" / "runs"
DOC = ROOT / "docs" / "results.md"
ROUNDING = 5e-5 + 1e-9
"""The doc prints losses and ΔL to 4 decimals."""
PROSE_ROUNDING = 5e-4 + 1e-9
"""Its prose prints them to 3."""


def records(variant: str, seed: int) -> list[dict]:
    """A committed run's metrics.jsonl, one dict per step."""
    return [json.loads(line) for line in (RUNS / variant / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()]


def final_loss(variant: str, seed: int) -> float:
    last = records(variant, seed)[-1]
    assert last["step"] == 1500 and "val_loss" in last, f"{variant} seed {seed} is not a finished run"
    return last["val_loss"]


def study2_section() -> str:
    text = DOC.read_text()
    start = text.index("## Study v2")
    return text[start:text.index("\n## ", start + 1)]


def table_after(heading: str, first_column: str = "seed") -> list[dict[str, str]]:
    """The first markdown table after ``heading`` whose first header cell is ``first_column``, as dicts."""
    section = study2_section()
    lines = section[section.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and cells(line)[0] == first_column)
    header = cells(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, cells(line), strict=True)))
    return rows


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def number(cell: str) -> float:
    return float(cell.replace("*", "").replace("−", "-"))


def interval(cell: str) -> tuple[float, float, float, float]:
    """``"**-0.0464 ± 0.0475 [-0.0700, -0.0227]**"`` -> mean, sd, lo, hi."""
    mean, sd, lo, hi = re.findall(r"[-+]?\d+\.\d+", cell)
    return float(mean), float(sd), float(lo), float(hi)


def assert_t_interval(cell: str, values, label: str = "") -> None:
    """``cell`` (``mean ± sd [lo, hi]``) is the t interval of ``values``, to the printed decimals."""
    s = summarize(values)
    assert interval(cell) == pytest.approx((s.mean, s.sd, s.lo, s.hi), abs=ROUNDING), label


def checked_pairs(rows: list[dict[str, str]]) -> dict[int, float]:
    """``{seed: ΔL}`` of a table of baseline / KHA-MLP v pairs, each row checked against the committed runs."""
    deltas = {}
    for row in rows:
        seed = int(row["seed"])
        base, knock = final_loss("baseline", seed), final_loss("mlp-v", seed)
        assert number(row["baseline"]) == pytest.approx(base, abs=ROUNDING), seed
        assert number(row["KHA-MLP v"]) == pytest.approx(knock, abs=ROUNDING), seed
        assert number(row["ΔL (paired)"]) == pytest.approx(knock - base, abs=ROUNDING), seed
        deltas[seed] = knock - base
    return deltas


def test_the_main_result_table_holds_the_committed_final_losses_and_their_paired_interval():
    deltas = checked_pairs(table_after("### Result:"))
    assert sorted(deltas) == list(range(18))  # the planned seeds
    summary = {r[""]: r["mean ± sd [95 % CI]"] for r in table_after("### Result:", first_column="")}
    assert_t_interval(summary["ΔL (paired)"], deltas.values())


def test_the_other_arms_table_holds_the_committed_final_losses():
    columns = {"baseline": "baseline", "KHA-MLP v": "mlp-v", "KHA-Linear q,k,v": "linear-qkv",
               "KHA-MLP v, decayed toward I": "mlp-v-identity"}
    rows = table_after("### The other arms")
    assert len(rows) >= 5
    for row in rows:
        for column, variant in columns.items():
            assert number(row[column]) == pytest.approx(final_loss(variant, int(row["seed"])), abs=ROUNDING)


def test_the_fp32_check_table_holds_the_committed_final_losses_and_their_differences():
    rows = table_after("### Precision")
    assert len(rows) >= 2
    for row in rows:
        seed = int(row["seed"])
        loss = {v: final_loss(v, seed) for v in ("baseline", "fp32-baseline", "mlp-v", "fp32-mlp-v")}
        for column, variant in {"baseline bf16": "baseline", "baseline fp32": "fp32-baseline",
                                "KHA-MLP v bf16": "mlp-v", "KHA-MLP v fp32": "fp32-mlp-v"}.items():
            assert number(row[column]) == pytest.approx(loss[variant], abs=ROUNDING), (seed, column)
        bf16, fp32 = loss["mlp-v"] - loss["baseline"], loss["fp32-mlp-v"] - loss["fp32-baseline"]
        assert number(row["ΔL bf16"]) == pytest.approx(bf16, abs=ROUNDING)
        assert number(row["ΔL fp32"]) == pytest.approx(fp32, abs=ROUNDING)
        assert number(row["ΔL fp32 - ΔL bf16"]) == pytest.approx(fp32 - bf16, abs=ROUNDING)


def test_the_fp32_check_summary_rows_are_the_t_intervals_of_its_seeds():
    seeds = [int(row["seed"]) for row in table_after("### Precision")]
    loss = {(v, s): final_loss(v, s) for v in ("baseline", "fp32-baseline", "mlp-v", "fp32-mlp-v") for s in seeds}

    def differences(a: str, b: str) -> list[float]:
        return [loss[a, s] - loss[b, s] for s in seeds]

    fp32_delta, bf16_delta = differences("fp32-mlp-v", "fp32-baseline"), differences("mlp-v", "baseline")
    expected = {
        "KHA-MLP v - baseline, fp32": fp32_delta,
        "KHA-MLP v - baseline, bf16, the same seeds": bf16_delta,
        "**ΔL in fp32 - ΔL in bf16** (the interaction)": [f - b for f, b in zip(fp32_delta, bf16_delta, strict=True)],
        "baseline: fp32 - bf16": differences("fp32-baseline", "baseline"),
        "KHA-MLP v: fp32 - bf16": differences("fp32-mlp-v", "mlp-v"),
    }
    label_column = f"paired contrast (final, {len(seeds)} seeds)"
    rows = {r[label_column]: r["mean ± sd [95 % t interval]"] for r in table_after("### Precision", label_column)}
    assert sorted(rows) == sorted(expected)
    for label, values in expected.items():
        assert_t_interval(rows[label], values, label)


def test_the_pairs_beyond_the_plan_hold_the_committed_final_losses_and_the_pooled_interval():
    planned, beyond = table_after("### Result:"), table_after("### Beyond the plan")
    deltas = checked_pairs(planned + beyond)
    assert len(deltas) == len(planned) + len(beyond) > 18
    assert sorted(deltas) == list(range(len(deltas)))  # every seed once, none skipped
    summary = {r["pairs"]: r["mean ± sd [95 % CI]"] for r in table_after("### Beyond the plan", first_column="pairs")}
    for label, values in ((f"ΔL (paired), all {len(deltas)}", list(deltas.values())),
                          (f"ΔL (paired), the {len(deltas) - 4} AMX pairs", [d for s, d in deltas.items() if s >= 4])):
        assert_t_interval(summary[label], values, label)


def validation_curve(variant: str, seed: int) -> dict[int, float]:
    """``{tokens: validation loss}`` at every evaluation of a committed run."""
    return {r["tokens"]: r["val_loss"] for r in records(variant, seed) if "val_loss" in r}


def test_the_delta_against_tokens_of_the_pairs_beyond_the_plan_is_that_of_the_listed_seeds():
    seeds = sorted(checked_pairs(table_after("### Result:") + table_after("### Beyond the plan")))
    rows = {r["tokens"]: r for r in table_after("### Beyond the plan", first_column="tokens")}
    header = [column for column in rows["ΔL"] if column != "tokens"]
    assert len(header) == 6  # every evaluation: 250 steps of 4,096 tokens apart
    base = {s: validation_curve("baseline", s) for s in seeds}
    knock = {s: validation_curve("mlp-v", s) for s in seeds}
    for column in header:
        tokens = round(float(column.rstrip("M")) * 1e6)
        tokens = min(base[seeds[0]], key=lambda t: abs(t - tokens))  # the printed column is rounded
        s = summarize([knock[seed][tokens] - base[seed][tokens] for seed in seeds])
        assert number(rows["ΔL"][column].rstrip("*")) == pytest.approx(s.mean, abs=ROUNDING), column
        assert rows["ΔL"][column].endswith("*") == s.excludes_zero, column
        lo, hi = re.findall(r"[-+]?\d+\.\d+", rows["95 % CI"][column])
        assert (float(lo), float(hi)) == pytest.approx((s.lo, s.hi), abs=ROUNDING), column


def reading(heading: str, opening: str = "**Reading.**") -> str:
    """The paragraph of a subsection that opens with ``opening`` (its **Reading.**), its lines joined."""
    section = study2_section()
    text = section[section.index(heading):]
    text = text[text.index(opening):]
    return " ".join(text[:text.index("\n\n")].split())


def prose_numbers(text: str, after: str, count: int) -> list[float]:
    """The first ``count`` decimal numbers that follow ``after`` in ``text``."""
    tail = text[text.index(after) + len(after):]
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+", tail)[:count]]


def test_the_reading_of_the_pairs_beyond_the_plan_is_that_of_the_listed_pairs():
    """Every statistic the reading quotes, recomputed from the committed runs of the seeds its tables list."""
    deltas = checked_pairs(table_after("### Result:") + table_after("### Beyond the plan"))
    n, values = len(deltas), list(deltas.values())
    text = reading("### Beyond the plan")
    approx = lambda *xs: pytest.approx(xs, abs=PROSE_ROUNDING)  # noqa: E731

    pooled = summarize(values)
    assert prose_numbers(text, f"With {n} pairs the estimate is", 4) == approx(pooled.mean, pooled.lo, pooled.hi,
                                                                            pooled.hi - pooled.mean)
    assert f"{sum(d < 0 for d in values)} of {n} pairs favour KHA-MLP v" in text
    amx = summarize([d for s, d in deltas.items() if s >= 4])
    assert prose_numbers(text, f"Over the {n - 4} AMX pairs alone,", 3) == approx(amx.mean, amx.lo, amx.hi)
    beyond = [d for s, d in deltas.items() if s >= 18]
    beyond_mean = sum(beyond) / len(beyond)
    assert prose_numbers(text, f"The {len(beyond)} pairs beyond the plan average", 1) == approx(beyond_mean)
    form = welch_difference(beyond, [d for s, d in deltas.items() if 4 <= s < 18])
    assert prose_numbers(text, "against the planned AMX pairs,", 3) == approx(form.mean, form.lo, form.hi)
    assert prose_numbers(text, "the Hodges-Lehmann estimate is", 3) == approx(*signed_rank_interval(values))

    base = {s: final_loss("baseline", s) for s in deltas}
    knock = {s: final_loss("mlp-v", s) for s in deltas}
    ratio = paired_sd_ratio([knock[s] for s in deltas], [base[s] for s in deltas])
    sd_knock, sd_base = summarize(knock.values()).sd, summarize(base.values()).sd
    assert prose_numbers(text, "baseline's: sd", 5) == approx(sd_knock, sd_base, *ratio)

    largest = sorted(deltas, key=deltas.get)[:4]
    assert prose_numbers(text, "The 4 largest gains (", 4) == approx(*(deltas[s] for s in largest))
    assert f"seeds {', '.join(map(str, largest))})" in text
    worst_first = sorted(deltas, key=lambda s: -base[s])
    ranks = [worst_first.index(s) + 1 for s in largest]
    suffix = {1: "st", 2: "nd", 3: "rd"}
    ordinals = ", ".join(f"{r}{'th' if 10 <= r % 100 <= 20 else suffix.get(r % 10, 'th')}" for r in ranks)
    assert f"baselines rank {ordinals} worst of {n}" in text

    upper = sd_upper_bound(pooled.sd, n)
    need, need_upper = seeds_for_half_width(pooled.sd, 0.015), seeds_for_half_width(upper, 0.015)
    assert prose_numbers(text, "At the pooled sd,", 1) == approx(pooled.sd)
    assert f"about **{need} pairs** ({need_upper} at the sd's one-sided 90 % upper bound" in text
    assert prose_numbers(text, "one-sided 90 % upper bound,", 1) == approx(upper)
    if need > n:
        assert f"{need - n} more" in text
    else:
        assert "the target is reached" in text


def test_the_heading_and_the_conclusion_quote_the_pooled_interval_of_the_listed_pairs():
    """Once the pooled interval's half-width is within the target, the section's heading says so with the interval,
    and the conclusion quotes it, the Hodges-Lehmann estimate and where it lies against the paper's effects."""
    deltas = checked_pairs(table_after("### Result:") + table_after("### Beyond the plan"))
    n, values = len(deltas), list(deltas.values())
    pooled = summarize(values)
    heading = study2_section().splitlines()[0]
    if pooled.hi - pooled.mean > 0.015:
        assert "target reached" not in heading
        return
    approx = lambda *xs: pytest.approx(xs, abs=PROSE_ROUNDING)  # noqa: E731
    assert f"at {n} pairs, the ±0.015 target reached" in heading
    assert prose_numbers(heading, "KHA-MLP v", 3) == approx(pooled.mean, pooled.lo, pooled.hi)
    text = reading("### Beyond the plan", "**Conclusion.**")
    assert f"At {n} pairs the study answers its question" in text
    assert prose_numbers(text, "changes the final validation loss by", 6) == approx(
        pooled.mean, pooled.lo, pooled.hi, *signed_rank_interval(values))
    paper_largest = -0.024  # the paper's largest KHA effect in its tables (docs/results.md, the design)
    assert ("lies beyond the paper's largest effects" in text) == (pooled.hi < paper_largest)
