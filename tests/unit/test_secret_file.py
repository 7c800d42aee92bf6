"""The generated-secret file every stack secret goes through: made once, owner-only, never regenerated."""

import stat

from sum_platform.files import owner_only_secret


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_a_secret_is_generated_once_into_an_owner_only_file(tmp_path):
    path = tmp_path / "stack" / "token"
    calls = []

    def make():
        calls.append(1)
        return f"secret-{len(calls)}"

    assert owner_only_secret(path, make) == "secret-1"
    assert owner_only_secret(path, make) == "secret-1"  # read back, not made again
    assert len(calls) == 1 and _mode(path) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name != "token"]  # no temporary left beside it


def test_a_loosened_mode_is_tightened_and_the_secret_kept(tmp_path):
    path = tmp_path / "token"
    owner_only_secret(path, lambda: "s3cret")
    path.chmod(0o644)
    assert owner_only_secret(path, lambda: "other") == "s3cret"
    assert _mode(path) == 0o600
