"""Markdown tables of protocol results: mean Spearman with 95% intervals, the gain over generic, a verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from piaa_personalization.evaluation.curves import Curves
from piaa_personalization.evaluation.live import LIVE
from piaa_personalization.evaluation.protocol import METHODS_BY_NAME, ProtocolResult, Summary, summarize


def _f(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.3f}" if x < 0 else f"{x:.3f}"


def _ci(ci: tuple[float, float]) -> str:
    return f"[{_f(ci[0])}, {_f(ci[1])}]"


def verdict(ci: tuple[float, float]) -> str:
    """'better' / 'worse' when the 95% interval of a gain excludes 0, else 'no difference'."""
    if not all(math.isfinite(c) for c in ci):
        return "n/a"
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no difference"


def _label(name: str) -> str:
    method = METHODS_BY_NAME.get(name) or (LIVE if name == LIVE.name else None)
    return method.label if method else name


def main_table(rows: Sequence[Summary]) -> str:
    """The comparison: one row per (k, method)."""
    out = [
        "| k | method | raters | mean Spearman [95% CI] | std over reps "
        "| gain vs generic [95% CI] | vs generic |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sorted(rows, key=lambda s: s.k):
        gain = "—" if s.method == "generic" else f"{_f(s.gain)} {_ci(s.gain_ci)}"
        word = "—" if s.method == "generic" else verdict(s.gain_ci)
        out.append(
            f"| {s.k} | {_label(s.method)} | {s.raters} | {_f(s.mean)} {_ci(s.ci)} | {s.std_reps:.3f} "
            f"| {gain} | {word} |"
        )
    return "\n".join(out)


def breakdown_table(result: ProtocolResult, groups: dict[str, np.ndarray]) -> str:
    """Gain over generic (mean [95% CI], verdict) per rater group, method and k."""
    methods = [m for m in result.methods if not m.generic]
    head = "| raters | k | generic | " + " | ".join(m.label for m in methods) + " |"
    out = [head, "|" + "---|" * (3 + len(methods))]
    for name, mask in groups.items():
        rows = summarize(result, mask)
        for k in result.ks:
            at_k = {s.method: s for s in rows if s.k == k}
            if "generic" not in at_k:
                continue
            cells = [
                f"{_f(at_k[m.name].gain)} {_ci(at_k[m.name].gain_ci)} {verdict(at_k[m.name].gain_ci)}"
                for m in methods
                if m.name in at_k
            ]
            out.append(
                f"| {name} ({at_k['generic'].raters}) | {k} | {_f(at_k['generic'].mean)} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(out)


def curves_table(curves: Curves) -> str:
    """Per checkpoint: random and active mean Spearman [95% CI], and active minus random (paired)."""
    rand, rand_ci = curves.mean_ci("random")
    act, act_ci = curves.mean_ci("active")
    rand_gain, rand_gain_ci = curves.over_generic("random")
    act_gain, act_gain_ci = curves.over_generic("active")
    out = [
        "| k | random choice | active (suggest) | random − generic | active − generic "
        "| active − random [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, k in enumerate(curves.ks):
        gain, ci = curves.gain(k)
        out.append(
            f"| {k} | {_f(rand[i])} {_ci(tuple(rand_ci[i]))} | {_f(act[i])} {_ci(tuple(act_ci[i]))} "
            f"| {_f(rand_gain[i])} {_ci(tuple(rand_gain_ci[i]))} "
            f"| {_f(act_gain[i])} {_ci(tuple(act_gain_ci[i]))} "
            f"| {_f(gain)} {_ci(ci)} | {verdict(ci)} |"
        )
    return "\n".join(out)


def as_json(rows: Sequence[Summary]) -> list[dict[str, Any]]:
    """Summaries as plain dicts (for the JSON record of a run)."""
    return [s.__dict__ | {"ci": list(s.ci), "gain_ci": list(s.gain_ci)} for s in rows]
