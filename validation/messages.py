"""Failure messages of the data gate: one readable line per failed GX expectation.

:func:`describe_failure` turns a failed ``ExpectationValidationResult`` into
``<expectation>(<column>): <observed problem>``, the line of ``ValidationReport.failed`` (or ``warnings``)
that the corruption catalogue (:mod:`validation.corruptions`) matches on: a check that could not run says
which column was missing or what it raised; the trailing checks add their baseline (from the notes of
:func:`validation.profiles.trailing_plan`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from validation.suites import CONTENT_DIGEST, EXTREME_VALUES


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float) and abs(value) >= 1e15:
        return f"{value:.3g}"
    if isinstance(value, np.generic):
        return _fmt(value.item())
    if isinstance(value, np.ndarray):
        return repr(value.tolist())
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return repr(value)


def _examples(result: dict) -> str:
    values = result.get("partial_unexpected_list") or []
    if not values:
        return ""
    return "; e.g. " + ", ".join(_fmt(v) for v in values[:3])


def _target(kwargs: dict) -> str:
    if "column" in kwargs:
        return kwargs["column"]
    if "column_A" in kwargs:
        return f"{kwargs['column_A']}, {kwargs['column_B']}"
    return "table"


def _num(value: Any) -> str:
    if value is None:
        return "None"
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.3g}"


def _largest_shift(details: dict) -> str:
    """The bin whose share moved most, from the KL expectation's observed/expected partitions."""
    try:
        obs, exp = details["observed_partition"], details["expected_partition"]
        edges = [-math.inf, *obs["bins"], math.inf]
        o = [obs["tail_weights"][0], *obs["weights"], obs["tail_weights"][1]]
        e = [exp["tail_weights"][0], *exp["weights"], exp["tail_weights"][1]]
        if len(o) != len(edges) - 1:  # partitions with finite ends: no tails in the weights
            edges, o, e = list(obs["bins"]), list(obs["weights"]), list(exp["weights"])
        i = int(np.argmax(np.abs(np.asarray(o) - np.asarray(e))))
        return (f"; largest change: bin [{_num(edges[i])}, {_num(edges[i + 1])}) holds {o[i]:.1%} of values "
                f"vs {e[i]:.1%} on the previous day")
    except (KeyError, IndexError, TypeError, ValueError):
        return ""


def describe_failure(result, columns: set[str], notes: dict[str, str] | None = None) -> str:
    """One readable line for a failed GX ``ExpectationValidationResult``.

    Args:
        result: The failed result.
        columns: Columns of the validated frame (to say which missing column stopped an expectation).
        notes: Context of the trailing checks (their baseline), keyed by ``<expectation>(<target>)``.
    """
    notes = notes or {}
    cfg = result.expectation_config
    etype, kwargs = cfg.type, dict(cfg.kwargs)
    res = dict(result.result or {})
    head = f"{etype}({_target(kwargs)})"
    note = notes.get(head)

    missing = [c for c in (kwargs.get("column"), kwargs.get("column_A"), kwargs.get("column_B")) if c and c not in columns]
    if missing:
        source = missing[0].split("__")[0]
        extra = f" (derived from {source!r}, which is missing)" if "__" in missing[0] and source not in columns else ""
        return f"{head}: not evaluated, column {missing[0]!r} is missing{extra}"
    exc = result.exception_info or {}
    if isinstance(exc, dict):
        # Either {"raised_exception": bool, "exception_message": ...} or {metric id: {...}, ...}.
        if "raised_exception" in exc:
            msgs = [exc.get("exception_message")] if exc.get("raised_exception") else []
        else:
            msgs = [v.get("exception_message") for v in exc.values() if isinstance(v, dict)]
        msgs = [m for m in msgs if m]
        if msgs:
            return f"{head}: not evaluated, raised {str(msgs[0]).strip().splitlines()[-1]}"

    if etype == "expect_table_columns_to_match_set":
        mismatch = (res.get("details") or {}).get("mismatched") or {}
        if kwargs.get("exact_match", True):  # GX leaves the default (True) out of the kwargs
            return f"{head}: unexpected columns {sorted(mismatch.get('unexpected', []))} (ignored by training)"
        return f"{head}: missing required columns {mismatch.get('missing', [])}"
    if etype == "expect_table_row_count_to_be_between":
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        expected = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        context = f" ({note})" if note and hi is not None else ""
        return f"{head}: observed {res.get('observed_value')} rows, expected {expected}{context}"
    if etype == "expect_column_mean_to_be_between":
        context = f"; {note}" if note else ""
        observed = res.get("observed_value")
        value = "not computable (no rows)" if observed is None else _num(observed)
        return (f"{head}: label rate {value} outside "
                f"[{_num(kwargs.get('min_value'))}, {_num(kwargs.get('max_value'))}]{context}")
    if etype == "expect_column_kl_divergence_to_be_less_than":
        observed = res.get("observed_value")
        finite = observed is not None and math.isfinite(float(observed))
        value = f"{float(observed):.4g}" if finite else "not computable (no values)"
        baseline = notes.get("previous_day")
        against = f" vs the previous validated day {baseline}" if baseline else ""
        shift = _largest_shift(res.get("details") or {}) if finite else ""
        return (f"{head}: distribution drift of {kwargs.get('column')!r}: KL divergence {value}{against} "
                f"> {kwargs.get('threshold')}{shift}")
    if etype == "expect_column_values_to_not_be_in_set" and kwargs.get("column") == CONTENT_DIGEST:
        digest = next(iter(res.get("partial_unexpected_list") or []), None)
        days = json.loads(notes.get("digest_days", "{}"))
        return (f"{head}: partition content identical to the validated partition of "
                f"{days.get(digest, 'a trailing day')} (digest {digest}): a stuck or re-delivered day")
    if etype == "expect_column_values_to_be_null" and str(kwargs.get("column", "")).endswith("__without_user_row"):
        return (f"{head}: {res.get('unexpected_count')} of {res.get('element_count')} impressions have a "
                f"user_id with no row in the users partition{_examples(res)}")
    if "unexpected_count" not in res:  # aggregate expectations (column dtype checks)
        expected = kwargs.get("type_list") or kwargs.get("value_set")
        return f"{head}: observed {res.get('observed_value')!r}, expected one of {expected}"

    count = f"{res.get('unexpected_count')} of {res.get('element_count')} values"
    if (getattr(cfg, "meta", None) or {}).get("check") == EXTREME_VALUES:
        share = (res.get("unexpected_percent") or 0.0) / 100.0
        column = kwargs.get("column")
        context = notes.get(f"extreme_values({column})")
        return (f"{head}: extreme values of {column!r}: {count} ({share:.2%}) outside "
                f"[{_num(kwargs.get('min_value'))}, {_num(kwargs.get('max_value'))}]"
                + (f" ({context})" if context else "")
                + ("; e.g. " + ", ".join(_num(v) for v in examples[:3]) if (examples := res.get("partial_unexpected_list"))
                   else ""))
    if etype == "expect_column_values_to_be_between":
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        close = ")" if kwargs.get("strict_max") or hi is None else "]"
        bounds = f"[{'-inf' if lo is None else _fmt(lo)}, {'inf' if hi is None else _fmt(hi)}{close}"
        problem = f"outside {bounds}"
        mostly = kwargs.get("mostly")
        if mostly is not None and mostly < 1:
            problem += f" (more than {1 - mostly:.2%} of the rows)"
    elif etype == "expect_column_values_to_not_be_null":
        return f"{head}: {count} are null"
    elif etype == "expect_column_values_to_be_in_set":
        problem = f"not in {kwargs.get('value_set')}"
    elif etype == "expect_column_values_to_be_unique":
        problem = "are duplicated"
    elif etype == "expect_column_pair_values_a_to_be_greater_than_b":
        op = "<" if kwargs.get("or_equal") else "<="
        problem = f"have {kwargs['column_A']} {op} {kwargs['column_B']}"
        count = f"{res.get('unexpected_count')} of {res.get('element_count')} rows"
    elif etype == "expect_column_values_to_be_in_type_list":
        problem = f"not of type {kwargs.get('type_list')}"
    elif etype == "expect_column_values_to_not_be_in_set":
        problem = f"in {kwargs.get('value_set')}"
    else:
        problem = "unexpected"
    return f"{head}: {count} {problem}{_examples(res)}"
