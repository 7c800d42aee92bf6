"""What a test does when it cannot set up the fault it exists to inject (a tmpfs mount that needs root, ...).

Locally it skips, saying why. Under CI (``CI=true``, as CI services set it) or ``SUM_REQUIRE_ALL_TESTS=1`` it
fails: a green CI run must have run every fault, not skipped the ones its machine could not stage.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["all_tests_required", "cannot_set_up"]


def all_tests_required() -> bool:
    """Whether skipping a fault is a failure here (``CI`` or ``SUM_REQUIRE_ALL_TESTS`` set to a true value)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes")
               for name in ("CI", "SUM_REQUIRE_ALL_TESTS"))


def cannot_set_up(reason: str) -> None:
    """Skips the test (fails it under CI / ``SUM_REQUIRE_ALL_TESTS=1``) because its fault could not be set up."""
    if all_tests_required():
        pytest.fail(f"cannot set up the fault: {reason} (CI or SUM_REQUIRE_ALL_TESTS is set, so this is a "
                    f"failure, not a skip: run the tests as root with CAP_SYS_ADMIN)", pytrace=False)
    pytest.skip(reason)
