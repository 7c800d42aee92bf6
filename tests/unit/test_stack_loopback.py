"""The stack's Ray stays on loopback: Ray 2.60 swaps a loopback address for the host's network address, which
`keep_loopback` undoes for the stack's nodes and the processes attaching to them; a non-loopback `ray.node_ip` is
refused before anything starts (Ray's Prometheus exporters have no authentication)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.ray_cluster import is_loopback, keep_loopback
from sum_pipeline.stack import Stack, StackError
from sum_platform.config import load_params
from sum_platform.workspace import Workspace


def test_ray_keeps_a_loopback_address_as_given_and_resolves_others_as_before():
    from ray._private import services

    original = services.resolve_ip_for_localhost
    try:
        assert original("127.0.0.1") != "127.0.0.1" or not _has_network()  # what Ray does by itself
        keep_loopback()
        keep_loopback()  # idempotent: wraps once
        resolve = services.resolve_ip_for_localhost
        assert resolve("127.0.0.1") == "127.0.0.1" and resolve("localhost") == "127.0.0.1"
        assert resolve("::1") == "::1"
        assert resolve("10.1.2.3") == original("10.1.2.3") == "10.1.2.3"
        assert getattr(resolve, "keeps_loopback", False) and resolve is services.resolve_ip_for_localhost
    finally:
        services.resolve_ip_for_localhost = original


def _has_network() -> bool:
    from ray._raylet import node_ip_address_from_perspective

    return node_ip_address_from_perspective() != "127.0.0.1"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                            ("::1", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                            ("example.org", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_up_refuses_a_node_ip_beyond_loopback_before_touching_anything(tmp_path):
    params = load_params()
    params = params.model_copy(update={"ray": params.ray.model_copy(update={"node_ip": "0.0.0.0"})})
    stack = Stack(params, Workspace(tmp_path / "ws"))
    with pytest.raises(StackError, match=r"ray.node_ip '0.0.0.0' is not a loopback address.*Prometheus"):
        stack.up()
    assert not Path(tmp_path / "ws").exists()
