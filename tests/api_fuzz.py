"""Schema-driven fuzzing of an HTTP API from its own OpenAPI schema, with schemathesis (its 4.x Python API).

:func:`fuzz_api` loads ``{base_url}/openapi.json`` and, for every operation, sends hypothesis-generated requests
over HTTP: first schema-valid ones, then schema-invalid ones (schemathesis's negative mode). Every response goes
through schemathesis's checks: no 5xx but a documented 503 (``not_a_server_error``), the status code, content type
and body as the schema documents them, valid data accepted (200, or the documented 404/413/503) and invalid data
not answered 2xx/3xx. Failures are collected, never raised: the caller asserts on the returned counts.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import hypothesis
import hypothesis.configuration
import requests
import schemathesis
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.control import SkipTest
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err

__all__ = ["fuzz_api", "ACCEPTED_STATUSES"]

# What a schema-valid request may be answered: the API's documented outcomes besides 200 (unknown user,
# oversized batch, store outage). Any other 4xx rejects valid data.
ACCEPTED_STATUSES = ["200", "404", "413", "503"]
# Every check gates itself on the case's mode (positive_data_acceptance on valid cases, negative_data_rejection on
# invalid ones), so one list serves both phases.
CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    negative_data_rejection,
)
_CONFIG = {
    "request-timeout": 30,
    "checks": {
        # 503 is a documented answer; status_code_conformance still flags it where an operation does not document it.
        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]},
        # Other 5xx are not_a_server_error's to report: listing them here keeps one failure per 500, not two.
        "positive_data_acceptance": {"expected-statuses": [*ACCEPTED_STATUSES, "5xx"]},
    },
}


class _OutOfTime(Exception):
    """Ends the running hypothesis loop once the overall deadline has passed."""


def fuzz_api(base_url: str, *, max_examples: int = 25, seed: int = 0, deadline_s: float = 120.0) -> dict:
    """Fuzz every operation of the API at ``base_url``; returns the counts, the failures and the statuses seen.

    ``{"operations": operations in the schema, "cases": requests sent, "failures": [{"operation", "check",
    "message", "status", "request", "count"}], "by_status": {code: count}}``. A failure repeated (same operation,
    check and message) is listed once with its ``count`` and its first request (as curl). Deterministic for a
    given ``seed`` and server; past ``deadline_s`` no further request is sent.
    """
    if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        # database=None still leaves hypothesis's charmap and constants caches in ./.hypothesis: keep them out
        hypothesis.configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "sum-api-fuzz-hypothesis")
    base_url = base_url.rstrip("/")
    stop_at = time.monotonic() + deadline_s
    config = schemathesis.Config.from_dict({**_CONFIG, "base-url": base_url, "seed": seed})
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=config, timeout=30)
    failures: dict[tuple, dict] = {}
    by_status: Counter[int] = Counter()
    sent = 0
    session = requests.Session()  # one keep-alive connection for the whole run

    def fail(operation: str, check: str, message: str, status: int | None, request: str) -> None:
        key = (operation, check, message)
        if key in failures:
            failures[key]["count"] += 1
        else:
            failures[key] = {"operation": operation, "check": check, "message": message[:300], "status": status,
                             "request": request[:1000], "count": 1}

    def send_and_check(case: schemathesis.Case) -> None:
        nonlocal sent
        if time.monotonic() > stop_at:
            raise _OutOfTime
        request = f"{case.method} {base_url}{case.formatted_path} query={case.query} body={case.body!r}"
        sent += 1
        try:
            response = case.call(base_url=base_url, session=session)
        except requests.RequestException as exc:  # refused, reset or timed out: the server did not answer
            fail(case.operation.label, "request", f"{type(exc).__name__}: {exc}", None, request)
            return
        by_status[response.status_code] += 1
        # One check at a time, so each failure is attributed to the check that raised it.
        for check in CHECKS:
            try:
                case.validate_response(response, checks=[check], transport_kwargs={"base_url": base_url})
            except FailureGroup as group:
                curl = case.as_curl_command(base_url=base_url)
                for failure in group.exceptions:
                    detail = (failure.message or "").strip().splitlines()
                    message = failure.title + (f": {detail[0]}" if detail else "")
                    fail(case.operation.label, check.__name__, message, response.status_code, curl)

    operations = 0
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            error = result.err()  # an operation schemathesis cannot read: a finding about the schema
            fail(getattr(error, "label", "-"), "schema", str(error).strip().splitlines()[0], None, "")
            continue
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > stop_at:
                break

            @hypothesis.seed(seed)
            @hypothesis.settings(
                max_examples=max_examples,
                deadline=None,
                database=None,  # no example database written into the project
                derandomize=False,  # the explicit seed decides, CI profile or not
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # nothing raises: no shrinking
                suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.filter_too_much],
                verbosity=hypothesis.Verbosity.quiet,
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                send_and_check(case)

            try:
                run()
            except _OutOfTime:
                break
            except (Exception, SkipTest) as exc:  # SkipTest is a BaseException
                # Nothing negatable (e.g. no parameters) is no finding; any other generation error is one, about
                # the schema, and must not end the run.
                if not (mode.is_negative and isinstance(exc, (SkipTest, Unsatisfiable))):
                    fail(operation.label, f"generation ({mode.value})", f"{type(exc).__name__}: {exc}", None, "")
    session.close()
    return {"operations": operations, "cases": sent, "failures": list(failures.values()), "by_status": dict(by_status)}
