"""Settings.from_env: defaults, then CONVEYOR_* variables, then explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.settings import Settings, default_db_url


def test_the_egress_policy_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_HTTP_ALLOWED_HOSTS", "api.example.com, *.internal.test,10.0.0.0/8,")
    monkeypatch.setenv("CONVEYOR_HTTP_DENIED_NETWORKS", "")
    monkeypatch.setenv("CONVEYOR_HTTP_MAX_CONCURRENCY", "8")
    settings = Settings.from_env()
    assert settings.http_allowed_hosts == ("api.example.com", "*.internal.test", "10.0.0.0/8")
    assert settings.http_denied_networks == ()  # set empty on purpose: nothing denied
    assert settings.http_max_concurrency == 8


def test_defaults_deny_link_local_and_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("CONVEYOR_HTTP_ALLOWED_HOSTS", "CONVEYOR_HTTP_DENIED_NETWORKS", "CONVEYOR_DB_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CONVEYOR_GRPC_PORT", "6000")
    settings = Settings.from_env(grpc_port=7000, data_dir=Path("/tmp/x"))
    assert "169.254.0.0/16" in settings.http_denied_networks and settings.http_allowed_hosts == ()
    assert settings.grpc_port == 7000
    assert settings.db_url == default_db_url(Path("/tmp/x"))


def test_envoy_restart_backoff_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().envoy_restart_first_seconds, Settings().envoy_restart_max_seconds,
            Settings().envoy_restart_reset_seconds) == (0.1, 10.0, 30.0)
    monkeypatch.setenv("CONVEYOR_ENVOY_RESTART_FIRST_SECONDS", "1.5")
    monkeypatch.setenv("CONVEYOR_ENVOY_RESTART_MAX_SECONDS", "60")
    monkeypatch.setenv("CONVEYOR_ENVOY_RESTART_RESET_SECONDS", "120")
    settings = Settings.from_env()
    assert (settings.envoy_restart_first_seconds, settings.envoy_restart_max_seconds,
            settings.envoy_restart_reset_seconds) == (1.5, 60.0, 120.0)
