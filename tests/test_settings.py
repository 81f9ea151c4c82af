"""Settings.from_env: defaults, then CONVEYOR_* variables, then explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.settings import Settings, default_db_url


def test_the_egress_allow_list_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_HTTP_ALLOW", "127.0.0.1:9000, 10.0.0.0/8,,localhost , *.internal.test")
    monkeypatch.setenv("CONVEYOR_HTTP_MAX_CONCURRENCY", "8")
    settings = Settings.from_env()
    assert settings.http_allow == ("127.0.0.1:9000", "10.0.0.0/8", "localhost", "*.internal.test")
    assert settings.http_max_concurrency == 8


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "a b", "127.0.0.1:0", "127.0.0.1:99999", "*.1.2.3.4",
                                   "[::1", "http://x/"])
def test_a_malformed_allow_entry_stops_the_start_named(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    monkeypatch.setenv("CONVEYOR_HTTP_ALLOW", f"127.0.0.1,{entry}")
    with pytest.raises(ValueError, match=r"CONVEYOR_HTTP_ALLOW: .* is not a host, host:port, or network"):
        Settings.from_env()


@pytest.mark.parametrize("old", ["CONVEYOR_HTTP_ALLOWED_HOSTS", "CONVEYOR_HTTP_DENIED_NETWORKS"])
def test_the_old_egress_settings_stop_the_start(monkeypatch: pytest.MonkeyPatch, old: str) -> None:
    # They restricted egress; read as the allow-list they would widen it: refused, not guessed.
    monkeypatch.setenv(old, "api.example.com")
    with pytest.raises(ValueError, match=f"{old} is no longer read: .* CONVEYOR_HTTP_ALLOW"):
        Settings.from_env()


def test_nothing_special_is_allowed_by_default_and_flags_win_over_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("CONVEYOR_HTTP_ALLOW", "CONVEYOR_DB_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CONVEYOR_GRPC_PORT", "6000")
    settings = Settings.from_env(grpc_port=7000, data_dir=Path("/tmp/x"))
    assert settings.http_allow == ()
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
