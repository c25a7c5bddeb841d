"""The public surface: __all__ pinned, install/uninstall/status, settings errors."""

from __future__ import annotations

import pytest
import requests

import llmshim
from llmshim import config

PUBLIC = [
    "CallRecord", "ConfigError", "Settings", "__version__", "cache_control", "install", "is_installed", "off", "on",
    "priority", "stats", "status", "uninstall",
]


def test_public_names_are_pinned() -> None:
    assert sorted(llmshim.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert hasattr(llmshim, name), name


def test_install_then_uninstall_restores_the_original_functions() -> None:
    from requests.adapters import HTTPAdapter

    before = HTTPAdapter.__dict__["send"]
    llmshim.install()
    assert llmshim.is_installed()
    assert HTTPAdapter.__dict__["send"] is not before
    assert HTTPAdapter.__dict__["send"].__wrapped__ is before
    llmshim.uninstall()
    assert not llmshim.is_installed()
    assert HTTPAdapter.__dict__["send"] is before


def test_install_twice_applies_new_settings_and_patches_once() -> None:
    from requests.adapters import HTTPAdapter

    original = HTTPAdapter.__dict__["send"]
    llmshim.install()
    first = HTTPAdapter.__dict__["send"]
    llmshim.install()
    assert HTTPAdapter.__dict__["send"] is first  # not wrapped twice
    llmshim.install(libraries="httpx2")
    assert HTTPAdapter.__dict__["send"] is original  # requests no longer wanted
    assert llmshim.status()["settings"]["libraries"] == ["httpx2"]
    llmshim.uninstall()
    llmshim.uninstall()  # twice is fine
    assert HTTPAdapter.__dict__["send"] is original


def test_status_reports_patched_attributes_and_versions(shim: None) -> None:
    info = llmshim.status()
    assert info["installed"] is True
    lib = info["libraries"]["requests"]
    assert lib["version"] == requests.__version__
    assert lib["patched"] == ["requests.adapters.HTTPAdapter.send"]
    settings = info["settings"]
    assert settings["libraries"] == ["aiohttp", "httpx", "httpx2", "requests"]
    assert (settings["enabled"], settings["telemetry"], settings["cache"]) == (True, True, "off")  # conftest: off
    assert settings["cache_scope"] == "credential" and settings["cache_max_bytes"] == 2**30


def test_disabled_by_environment_patches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from requests.adapters import HTTPAdapter

    original = HTTPAdapter.__dict__["send"]
    monkeypatch.setenv("LLMSHIM_ENABLED", "off")
    settings = llmshim.install()
    assert settings.enabled is False
    assert not llmshim.is_installed()
    assert HTTPAdapter.__dict__["send"] is original


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("LLMSHIM_ENABLED", "maybe", "LLMSHIM_ENABLED"),
        ("LLMSHIM_LIBRARIES", "httpx,urllib", "LLMSHIM_LIBRARIES"),
        ("LLMSHIM_LIBRARIES", "", "LLMSHIM_LIBRARIES"),
    ],
)
def test_malformed_variable_fails_at_install_naming_it(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(llmshim.ConfigError) as caught:
        llmshim.install()
    message = str(caught.value)
    assert needle in message and repr(value) in message and "expected" in message
    assert not llmshim.is_installed()


def test_overrides_win_over_environment_and_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSHIM_LIBRARIES", "requests")
    assert config.load(libraries="httpx").libraries == frozenset({"httpx"})
    with pytest.raises(llmshim.ConfigError, match="unknown setting"):
        llmshim.install(colour="blue")
    with pytest.raises(llmshim.ConfigError, match=r"install\(enabled=...\).*LLMSHIM_ENABLED"):
        llmshim.install(enabled="perhaps")


def test_boolean_forms() -> None:
    for raw in ("1", "true", "YES", "on", True):
        assert config.load({}, enabled=raw).enabled is True
    for raw in ("0", "false", "No", "off", False):
        assert config.load({}, enabled=raw).enabled is False


def test_every_option_is_documented_in_the_readme() -> None:
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    for option in config.OPTIONS:
        assert f"`{option.env}`" in readme, option.env


def test_hook_registration_validates_event_name() -> None:
    with pytest.raises(ValueError, match="call_completed"):
        llmshim.on("call_done", print)  # type: ignore[arg-type]


def test_concurrent_install_and_uninstall_never_double_patch() -> None:
    import threading

    from requests.adapters import HTTPAdapter

    original = HTTPAdapter.__dict__["send"]
    barrier = threading.Barrier(8)

    def churn() -> None:
        barrier.wait()
        for _ in range(50):
            llmshim.install()
            llmshim.uninstall()

    threads = [threading.Thread(target=churn) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert HTTPAdapter.__dict__["send"] is original
    llmshim.install()
    assert HTTPAdapter.__dict__["send"].__wrapped__ is original  # one layer, not a stack
    llmshim.uninstall()
