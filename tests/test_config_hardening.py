"""Every ``LLMSHIM_*`` value parses to a finite, in-range value, or fails at ``install()`` with a
``ConfigError`` naming the variable (and ``llmshim run`` / ``status`` / ``doctor`` exit 2).

The ranges below are the documented ones (README "For the README" text of the config work), written
out here independently of ``llmshim.config`` so that a silent change of a bound fails a test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import subprocess
import sys
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import llmshim
from conftest import ROOT
from llmshim import config

with warnings.catch_warnings():  # Hypothesis imports libcst to suggest a patch for a failing example;
    warnings.simplefilter("ignore", DeprecationWarning)  # under filterwarnings=error that import would
    with contextlib.suppress(ImportError):  # turn the report into an INTERNALERROR: import it here, quietly.
        import hypothesis.extra._patching  # noqa: F401

DAY = 86400.0

#: field -> (lowest, highest) accepted value; None is allowed where the option has an "empty: none" form.
RANGES: dict[str, tuple[float, float]] = {
    "cache_ttl": (1e-3, 3650 * DAY),
    "cache_max_entries": (1, 10**12),
    "cache_max_bytes": (1, 2**50),
    "cache_max_entry_bytes": (1024, 2**30),
    "retry_max_attempts": (1, 100),
    "retry_max_delay": (0, 30 * DAY),
    "rpm": (1, 10**12),
    "tpm": (1, 10**12),
    "ratelimit_burst": (0, DAY),
    "queue_timeout": (0, 30 * DAY),
    "cache_coalesce_timeout": (0, 3600),
    "max_concurrency": (1, 10**6),
    "token_reservation": (0, 10**8),
    "async_workers": (1, 1024),
    "async_queue_size": (0, 10**6),
    "async_timeout": (1e-3, 30 * DAY),
    "redis_timeout": (1e-3, 60),
}
LIMIT_MAX = 10**12  # per-model rates: > 0, at most this
NUMERIC = sorted(RANGES)
ENV = {option.name: option.env for option in config.OPTIONS}


def assert_valid(settings: config.Settings) -> None:
    """Every numeric field is a finite number in its documented range (or None where allowed)."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            assert field.name in RANGES, f"{field.name} is numeric but has no documented range"
            low, high = RANGES[field.name]
            assert math.isfinite(value) and low <= value <= high, (field.name, value)
    for model, limit in settings.limits.items():
        assert model.strip() and "\0" not in model
        for rate in (limit.rpm, limit.tpm):
            assert rate is None or (math.isfinite(rate) and 0 < rate <= LIMIT_MAX), limit


# -- the property: valid settings or a ConfigError naming the variable, never anything else -------

UNITS = ["", "s", "ms", "m", "h", "d", "w", "k", "K", "M", "G", "T", "KB", "MB", "GB", "KiB", "MiB", "GiB", "b",
         "rpm", "tpm", " s", "min", "\uff53", "\u212a"]  # fullwidth s, KELVIN SIGN (lower() gives ASCII 'k')
NASTY = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "1e-400", "1e3", "0x10", "1_000",
         "+5", "-0", "-5", "0", "00", "0.0", "5.", ".5", "", " ", "\t", "\x00", "5\x00", "\u0661\u0662",
         "\uff11\uff12", "\u00b2", "\u0663s", "\u0967\u0968k", "\u2167", "9" * 5000, "9" * 40, "1" + "0" * 400,
         "true", "on", "none", "never", "auto", "1 2", "5 s", "  7  ", "\u00a05", "5\u2003"]


def spellings() -> st.SearchStrategy[str]:
    """Numbers in every spelling: ASCII and other scripts' digits, floats, huge ints, units."""
    digits = st.text(st.characters(categories=["Nd"]), min_size=1, max_size=6)
    number = st.one_of(
        st.integers(min_value=-(10**30), max_value=10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.decimals(allow_nan=False, allow_infinity=False, places=3).map(str),
        digits,
        st.sampled_from(NASTY),
    )
    return st.one_of(
        st.builds(lambda n, u: f"{n}{u}", number, st.sampled_from(UNITS)),
        st.text(max_size=30),
        st.sampled_from(NASTY),
        st.builds(lambda m, n, u: f"{m}={n}{u}", st.text(max_size=6), number, st.sampled_from(["rpm", "tpm", "k tpm"])),
    )


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(option=st.sampled_from(config.OPTIONS), raw=spellings())
@example(option=next(o for o in config.OPTIONS if o.env == "LLMSHIM_QUEUE_TIMEOUT"), raw="inf")
@example(option=next(o for o in config.OPTIONS if o.env == "LLMSHIM_RETRY_MAX_DELAY"), raw="nan")
@example(option=next(o for o in config.OPTIONS if o.env == "LLMSHIM_RATELIMIT_BURST"), raw="nan")
@example(option=next(o for o in config.OPTIONS if o.env == "LLMSHIM_LIMITS"), raw="m=nanrpm")
def test_any_environment_value_gives_valid_settings_or_names_the_variable(option: config.Option, raw: str) -> None:
    try:
        loaded = config.load({option.env: raw})
    except config.ConfigError as exc:
        assert option.env in str(exc)
        return
    assert_valid(loaded)


@settings(max_examples=600, deadline=None)
@given(option=st.sampled_from(config.OPTIONS),
       raw=st.one_of(spellings(), st.integers(), st.floats(), st.booleans(), st.none(),
                     st.lists(st.text(max_size=5), max_size=3)))
def test_any_install_override_gives_valid_settings_or_names_the_variable(option: config.Option, raw: Any) -> None:
    try:
        loaded = config.load({}, **{option.name: raw})
    except config.ConfigError as exc:
        assert option.env in str(exc)
        return
    assert_valid(loaded)


# -- regressions: each example of the issue ---------------------------------------------------------

@pytest.mark.parametrize("field", NUMERIC)
@pytest.mark.parametrize("raw", ["inf", "-inf", "1e400", "nan", "NaN", "Infinity", pytest.param("9" * 5000, id="huge"),
                                 "\x00", "5\x00",
                                 "\u0661\u0662", "\uff11\uff12", "\u0967\u0968", "1_0", "0x10", " \t "])
def test_non_finite_huge_foreign_or_blank_numbers_are_refused_naming_the_variable(field: str, raw: str) -> None:
    env = ENV[field]
    with pytest.raises(config.ConfigError) as caught:
        config.load({env: raw})
    assert env in str(caught.value) and "expected" in str(caught.value)


@pytest.mark.parametrize(("env", "raw"), [("LLMSHIM_QUEUE_TIMEOUT", "inf"), ("LLMSHIM_RETRY_MAX_DELAY", "nan"),
                                          ("LLMSHIM_RATELIMIT_BURST", "nan"), ("LLMSHIM_CACHE_TTL", "1e400"),
                                          ("LLMSHIM_RPM", "-inf"), ("LLMSHIM_LIMITS", "gpt-4o=nanrpm"),
                                          ("LLMSHIM_LIMITS", "gpt-4o=\u0661\u0662rpm"),
                                          ("LLMSHIM_LIMITS", "gpt-4o=" + "9" * 400 + "tpm"),
                                          ("LLMSHIM_LIMITS", "gpt-4o=0rpm")])
def test_install_refuses_what_used_to_break_calls_later(monkeypatch: pytest.MonkeyPatch, env: str, raw: str) -> None:
    monkeypatch.setenv(env, raw)
    with pytest.raises(llmshim.ConfigError, match=env):
        llmshim.install()
    assert not llmshim.is_installed()


def test_upper_bounds_are_enforced() -> None:
    for env, raw in [("LLMSHIM_QUEUE_TIMEOUT", "31d"), ("LLMSHIM_RETRY_MAX_DELAY", "2592001"),
                     ("LLMSHIM_RETRY_MAX_ATTEMPTS", "101"), ("LLMSHIM_ASYNC_WORKERS", "1025"),
                     ("LLMSHIM_CACHE_TTL", "3651d"), ("LLMSHIM_RATELIMIT_BURST", "25h")]:
        with pytest.raises(config.ConfigError, match=env):
            config.load({env: raw})
    edge = config.load({"LLMSHIM_QUEUE_TIMEOUT": "30d", "LLMSHIM_RETRY_MAX_ATTEMPTS": "100",
                        "LLMSHIM_ASYNC_WORKERS": "1024", "LLMSHIM_CACHE_TTL": "3650d", "LLMSHIM_RATELIMIT_BURST": "1d"})
    assert (edge.queue_timeout, edge.retry_max_attempts, edge.async_workers) == (30 * DAY, 100, 1024)


BOOLEAN_OPTIONS = [o for o in config.OPTIONS if o.parse is config.OPTIONS[0].parse]


def test_there_are_several_boolean_options() -> None:
    assert {o.env for o in BOOLEAN_OPTIONS} >= {"LLMSHIM_ENABLED", "LLMSHIM_TELEMETRY", "LLMSHIM_CACHE_LOCAL",
                                                "LLMSHIM_ASYNC_ENABLED"}


@pytest.mark.parametrize("env", [o.env for o in BOOLEAN_OPTIONS] + ["LLMSHIM_CACHE"])
@pytest.mark.parametrize(("raw", "on"), [("true", True), ("TRUE", True), ("yes", True), ("on", True), ("1", True),
                                         ("false", False), ("No", False), ("off", False), ("0", False)])
def test_one_boolean_vocabulary_for_every_on_off_option(env: str, raw: str, on: bool) -> None:
    loaded = config.load({env: raw})
    field = next(o.name for o in config.OPTIONS if o.env == env)
    value = getattr(loaded, field)
    assert value == (("on" if on else "off") if env == "LLMSHIM_CACHE" else on)


@pytest.mark.parametrize("env", [o.env for o in BOOLEAN_OPTIONS] + ["LLMSHIM_CACHE"])
@pytest.mark.parametrize("raw", ["\uff54\uff52\uff55\uff45", "tru", "2", "", "y e s"])
def test_booleans_outside_the_vocabulary_are_refused(env: str, raw: str) -> None:
    with pytest.raises(config.ConfigError, match=env):
        config.load({env: raw})


@pytest.mark.parametrize(("raw", "size"), [("512M", 512 * 2**20), ("1G", 2**30), ("1g", 2**30), ("64k", 64 * 2**10),
                                           ("2T", 2 * 2**40), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30),
                                           ("500MB", 500 * 10**6), ("1GB", 10**9), ("10kb", 10**4),
                                           ("1.5G", 3 * 2**29), ("123", 123), ("123b", 123), ("512 M", 512 * 2**20),
                                           ("", None), ("none", None)])
def test_sizes(raw: str, size: int | None) -> None:
    assert config.load({"LLMSHIM_CACHE_MAX_BYTES": raw}).cache_max_bytes == size


def test_sizes_refuse_fractions_of_a_byte_and_unknown_units() -> None:
    assert config.load({"LLMSHIM_CACHE_MAX_BYTES": "0.5k"}).cache_max_bytes == 512
    for raw in ("1.5", "0.3k", "12X", "1 GB GB", "0", "2Gb/s", "2048P"):
        with pytest.raises(config.ConfigError, match="LLMSHIM_CACHE_MAX_BYTES"):
            config.load({"LLMSHIM_CACHE_MAX_BYTES": raw})


@pytest.mark.parametrize(("env", "raw", "field", "value"), [
    ("LLMSHIM_CACHE_TTL", "90s", "cache_ttl", 90.0), ("LLMSHIM_CACHE_TTL", "12h", "cache_ttl", 43200.0),
    ("LLMSHIM_CACHE_TTL", "1.5m", "cache_ttl", 90.0), ("LLMSHIM_CACHE_TTL", "250ms", "cache_ttl", 0.25),
    ("LLMSHIM_CACHE_TTL", "", "cache_ttl", None), ("LLMSHIM_CACHE_TTL", "never", "cache_ttl", None),
    ("LLMSHIM_RETRY_MAX_DELAY", "0", "retry_max_delay", 0.0), ("LLMSHIM_QUEUE_TIMEOUT", "0", "queue_timeout", 0.0),
    ("LLMSHIM_RATELIMIT_BURST", "0", "ratelimit_burst", 0.0),
    ("LLMSHIM_TOKEN_RESERVATION", "0", "token_reservation", 0),
    ("LLMSHIM_ASYNC_QUEUE_SIZE", "0", "async_queue_size", 0),
    ("LLMSHIM_TPM", "30k", "tpm", 30000), ("LLMSHIM_TPM", "1.5M", "tpm", 1500000), ("LLMSHIM_RPM", "", "rpm", None),
    ("LLMSHIM_RPM", "none", "rpm", None), ("LLMSHIM_RETRY_MAX_ATTEMPTS", "1", "retry_max_attempts", 1),
    ("LLMSHIM_CACHE_MAX_ENTRIES", "100k", "cache_max_entries", 100000),
    ("LLMSHIM_ASYNC_WORKERS", "", "async_workers", min(32, (os.cpu_count() or 1) * 4 + 4)),
])
def test_documented_forms_and_zero_meanings(env: str, raw: str, field: str, value: Any) -> None:
    assert getattr(config.load({env: raw}), field) == value


@pytest.mark.parametrize(("env", "raw"), [
    ("LLMSHIM_RETRY_MAX_ATTEMPTS", "0"),  # 0 attempts would never send: refused (LLMSHIM_RETRY_MODE=off disables)
    ("LLMSHIM_RETRY_MAX_ATTEMPTS", ""), ("LLMSHIM_RETRY_MAX_ATTEMPTS", "2.5"),
    ("LLMSHIM_RPM", "0"), ("LLMSHIM_TPM", "0"), ("LLMSHIM_RPM", "0.5"),  # no silent "0 means unlimited"
    ("LLMSHIM_CACHE_TTL", "0"), ("LLMSHIM_ASYNC_TIMEOUT", "0"), ("LLMSHIM_MAX_CONCURRENCY", "0"),
    ("LLMSHIM_CACHE_MAX_ENTRIES", "0"), ("LLMSHIM_ASYNC_WORKERS", "0"),
    ("LLMSHIM_QUEUE_TIMEOUT", ""), ("LLMSHIM_RETRY_MAX_DELAY", "-1"), ("LLMSHIM_TOKEN_RESERVATION", "-1"),
])
def test_zero_and_empty_never_silently_become_a_default(env: str, raw: str) -> None:
    with pytest.raises(config.ConfigError, match=env):
        config.load({env: raw})


def test_install_overrides_take_python_values() -> None:
    loaded = config.load({}, rpm=60, queue_timeout=2.5, cache_max_bytes="512M", retry_max_attempts=5,
                         cache_ttl=None, local_hosts=["GPU-box", "10.0.0.5"])
    assert (loaded.rpm, loaded.queue_timeout, loaded.cache_max_bytes, loaded.retry_max_attempts) == (
        60, 2.5, 512 * 2**20, 5)
    assert loaded.cache_ttl is None and loaded.local_hosts == frozenset({"gpu-box", "10.0.0.5"})
    with pytest.raises(config.ConfigError, match="LLMSHIM_RETRY_MAX_ATTEMPTS"):
        config.load({}, retry_max_attempts=None)
    for name, value in [("queue_timeout", float("inf")), ("rpm", float("nan")), ("retry_max_attempts", 10**400)]:
        with pytest.raises(config.ConfigError, match=ENV[name]):
            config.load({}, **{name: value})


def test_limits_accept_the_documented_form_only() -> None:
    limits = config.load({"LLMSHIM_LIMITS": "gpt-4o=500rpm,30ktpm; llama3.2 = 0.5rpm"}).limits
    assert (limits["gpt-4o"].rpm, limits["gpt-4o"].tpm, limits["llama3.2"].rpm) == (500, 30000, 0.5)
    for raw in ("gpt-4o=500", "=5rpm", "m=5rpm,", "m=\uff15rpm", "m=1e3rpm", "m=infrpm", "m=-5rpm", "m\x00=5rpm"):
        with pytest.raises(config.ConfigError, match="LLMSHIM_LIMITS"):
            config.load({"LLMSHIM_LIMITS": raw})


# -- unknown variables ------------------------------------------------------------------------------

def test_unknown_variable_warns_naming_the_nearest(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llmshim"):
        config.load({"LLMSHIM_CACHE_TLL": "3600", "LLMSHIM_RETRY_MAXDELAY": "1", "LLMSHIM_RUN_OTEL_EXPORTER": "otlp",
                     "LLMSHIM_CACHE": "on", "LLMSHIM_XYZZY_PLUGH": "1"})
    messages = [r.getMessage() for r in caplog.records if r.name == "llmshim"]
    assert any("LLMSHIM_CACHE_TLL" in m and "LLMSHIM_CACHE_TTL" in m for m in messages), messages
    assert any("LLMSHIM_RETRY_MAXDELAY" in m and "LLMSHIM_RETRY_MAX_DELAY" in m for m in messages), messages
    assert any("LLMSHIM_XYZZY_PLUGH" in m for m in messages), messages
    assert not any("LLMSHIM_RUN_OTEL_EXPORTER" in m for m in messages), messages  # used by `llmshim run`
    assert len(messages) == 3


def test_known_variables_never_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="llmshim"):
        config.load({option.env: option.default for option in config.OPTIONS})
    assert not [r for r in caplog.records if r.name == "llmshim"]


def test_install_warns_about_a_misspelt_variable(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LLMSHIM_RATELIMIT_BRUST", "5")
    with caplog.at_level(logging.WARNING, logger="llmshim"):
        llmshim.install()
    llmshim.uninstall()
    assert any("LLMSHIM_RATELIMIT_BRUST" in r.getMessage() and "LLMSHIM_RATELIMIT_BURST" in r.getMessage()
               for r in caplog.records)


# -- the command line: a bad value exits 2, naming the variable --------------------------------------

def _cli(args: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(extra, PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))  # this tree's llmshim
    return subprocess.run([sys.executable, "-m", "llmshim", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize(("env", "raw"), [("LLMSHIM_QUEUE_TIMEOUT", "inf"), ("LLMSHIM_RATELIMIT_BURST", "nan"),
                                          ("LLMSHIM_RPM", "\u0661\u0662"), ("LLMSHIM_CACHE_MAX_BYTES", "1e400")])
@pytest.mark.parametrize("command", ["run", "status", "doctor"])
def test_cli_exits_2_on_a_bad_value(command: str, env: str, raw: str) -> None:
    args = ["run", "--", sys.executable, "-c", "print('should not run')"] if command == "run" else [command]
    done = _cli(args, **{env: raw})
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert env in done.stdout + done.stderr and "should not run" not in done.stdout
    assert "Traceback" not in done.stderr
