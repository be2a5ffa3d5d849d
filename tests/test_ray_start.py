"""Starting or joining Ray: a failed join says why (Ray hides it under "Failed to connect")."""

from __future__ import annotations

import pytest
import ray

from rlhf.placement import start_ray
from vlrl.errors import VlrlError
from vlrl.recipe_rl import RaySpec


def _failing_join(*args, **kwargs):
    try:
        try:
            raise ray.exceptions.AuthenticationError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect.")
        except Exception as auth:
            raise RuntimeError("Failed to connect to GCS. Last connection error: ...") from auth
    except RuntimeError as gcs:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from gcs


def test_a_join_refused_for_its_token_names_the_cause_and_the_setting(monkeypatch):
    monkeypatch.setattr(ray, "init", _failing_join)
    with pytest.raises(VlrlError) as info:
        start_ray(RaySpec(address="10.0.0.5:6379"))
    msg = str(info.value)
    assert "the Ray cluster at '10.0.0.5:6379'" in msg
    assert "Failed to connect to Ray cluster" in msg and "InvalidAuthToken" in msg
    assert "RAY_AUTH_MODE=token" in msg


def test_a_join_with_no_cluster_there_gives_no_token_hint(monkeypatch):
    def nothing_there(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", nothing_there)
    with pytest.raises(VlrlError, match=r"at 'auto': Could not find any running Ray instance") as info:
        start_ray(RaySpec(address="auto"))
    assert "RAY_AUTH_MODE" not in str(info.value)
