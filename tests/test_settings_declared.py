"""Each setting is declared once (``llmshim.settings``) and everything else follows from it: the
defaults of ``Settings()`` and of ``load({})``, the README's table, the masking of credentials, the
mode words the command line offers, and the typed store locations."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from typing import Any, get_args

import pytest

import llmshim
from conftest import ROOT
from llmshim import cli, config, settings, values

FIELDS = [field.name for field in dataclasses.fields(config.Settings)]
ROW = re.compile(r"^\| `(LLMSHIM_[A-Z0-9_]+)` \| (.*?) \| (.*) \|$")


def readme_rows() -> list[str]:
    return [line for line in (ROOT / "README.md").read_text().splitlines() if ROW.match(line)]


# -- one declaration: the defaults ------------------------------------------------------------------

@pytest.mark.parametrize("name", FIELDS)
def test_the_default_of_every_field_is_the_loaded_default(name: str) -> None:
    assert getattr(config.Settings(), name) == getattr(config.load({}), name)


def test_settings_and_load_agree_as_a_whole_and_the_process_starts_from_them() -> None:
    from llmshim.runtime import State

    assert config.Settings() == config.load({})
    assert State().settings == config.load({})
    assert config.Settings().async_workers == min(32, (os.cpu_count() or 1) * 4 + 4)  # was 8 in one of two places


def test_every_field_is_an_option_named_after_it() -> None:
    assert [option.name for option in config.OPTIONS] == FIELDS
    for option in config.OPTIONS:
        assert option.env == "LLMSHIM_" + option.name.upper()
        assert option.doc and option.accepted, option.env


# -- one declaration: the README's table ------------------------------------------------------------

def test_the_readme_table_is_the_generated_one() -> None:
    """A setting missing from the README, a row for a variable that is not declared, or a default or
    meaning that differs from the declaration all fail here. Fix: paste `llmshim settings` output."""
    declared = [option.env for option in config.OPTIONS]
    documented = [m.group(1) for m in map(ROW.match, readme_rows()) if m]
    assert sorted(set(declared) - set(documented)) == [], "declared but missing from the README table"
    assert sorted(set(documented) - set(declared)) == [], "in the README table but not declared"
    generated = settings.markdown_table().splitlines()[2:]
    for row, expected in zip(readme_rows(), generated, strict=True):
        assert row == expected


def test_llmshim_settings_prints_the_table() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["settings"]) == 0
    assert out.getvalue().strip() == settings.markdown_table()
    assert "| `LLMSHIM_RUN_OTEL_EXPORTER` | empty |" in out.getvalue()


# -- one declaration: secrets -----------------------------------------------------------------------

PASSWORD = "Sw0rdfish-pa55"
CREDENTIAL_URLS = [
    f"redis://user:{PASSWORD}@cache-host:6379/0",
    f"redis://:{PASSWORD}@cache-host/2",
    f"rediss://default:{PASSWORD}@cache-host:6380/0",
    f"redis+cluster://user:{PASSWORD}@a:7000,b:7001",
    f"rediss+cluster://user:{PASSWORD}@a:7000",
    f"redis+sentinel://user:{PASSWORD}@s1:26379,s2:26379/mymaster/0",
    f"redis://cache-host:6379/0?password={PASSWORD}",
    f"unix://user:{PASSWORD}@/var/run/redis.sock",
]


def _shown(loaded: config.Settings) -> str:
    return json.dumps(loaded.masked(), ensure_ascii=False) + repr(loaded)


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
@pytest.mark.parametrize("option", config.OPTIONS, ids=lambda o: o.env)
def test_any_setting_that_takes_a_credential_url_is_secret_and_masked(option: config.Option, url: str) -> None:
    try:
        loaded = config.load({option.env: url})
    except config.ConfigError as exc:
        assert PASSWORD not in str(exc)
        return
    if getattr(loaded, option.name) == getattr(config.Settings(), option.name):
        return  # the value did not land in this setting
    assert option.secret, f"{option.env} accepts {url!r} but is not declared secret"
    assert PASSWORD not in _shown(loaded)


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
@pytest.mark.parametrize("name", ["cache_url", "ratelimit_store"])
def test_both_redis_settings_take_every_credential_url_and_mask_it(name: str, url: str) -> None:
    loaded = config.load({}, **{name: url})
    assert getattr(loaded, name) == url  # taken, as written
    assert PASSWORD not in _shown(loaded)


def test_status_masks_every_secret_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmshim.runtime import STATE

    monkeypatch.setattr(STATE, "settings", config.load({}, cache_url=CREDENTIAL_URLS[0],
                                                        ratelimit_store=CREDENTIAL_URLS[3]))
    shown = json.dumps(llmshim.status())
    assert PASSWORD not in shown and "cache-host" in shown


# -- one declaration: modes and stores ------------------------------------------------------------

@pytest.mark.parametrize(("name", "kind"), [("cache", values.CacheMode), ("retry_mode", values.RetryMode),
                                            ("cache_scope", values.CacheScope),
                                            ("cache_nondeterministic", values.Nondeterministic),
                                            ("priority", values.PriorityClass),
                                            ("run_otel_exporter", values.OtelExporter)])
def test_a_mode_setting_takes_exactly_the_words_of_its_literal(name: str, kind: Any) -> None:
    env = "LLMSHIM_" + name.upper()
    for word in get_args(kind):
        assert getattr(config.load({env: word.upper()}), name) == word
    with pytest.raises(config.ConfigError, match=env):
        config.load({env: "sometimes"})


def test_the_command_line_offers_the_same_mode_words() -> None:
    parser_choices = {}
    for flag in ("--cache", "--otel-exporter"):
        with pytest.raises(SystemExit) as caught, redirect_stderr_to_string() as err:
            cli.main(["run", flag, "sometimes", "--", "true"])
        assert caught.value.code == 2
        parser_choices[flag] = err.getvalue()
    for word in get_args(values.CacheMode):
        assert f"'{word}'" in parser_choices["--cache"]
    for word in get_args(values.OtelExporter):
        assert f"'{word}'" in parser_choices["--otel-exporter"]


def redirect_stderr_to_string() -> Any:
    from contextlib import redirect_stderr

    return redirect_stderr(io.StringIO())


@pytest.mark.parametrize(("raw", "kind"), [("memory", values.Memory),
                                           ("sqlite:///var/tmp/l.sqlite3", values.SQLiteFile),
                                           ("redis://h:6379/0", values.RedisURL),
                                           ("redis+sentinel://s:26379/m", values.RedisURL)])
def test_the_rate_limit_store_is_a_typed_value_that_is_still_its_text(raw: str, kind: type) -> None:
    loaded = config.load({"LLMSHIM_RATELIMIT_STORE": raw}).ratelimit_store
    assert type(loaded) is kind and loaded == raw and str(loaded) == raw
    assert config.load({"LLMSHIM_CACHE_URL": "redis://h/1"}).cache_url == values.RedisURL("redis://h/1")


def test_a_sqlite_store_knows_its_absolute_path() -> None:
    store = config.load({"LLMSHIM_RATELIMIT_STORE": "sqlite:////var//tmp/l.sqlite3"}).ratelimit_store
    assert isinstance(store, values.SQLiteFile) and store.path == "/var//tmp/l.sqlite3"


# -- the exporter of `llmshim run`, now a declared setting ----------------------------------------

def test_install_refuses_the_startup_only_setting_naming_it() -> None:
    with pytest.raises(config.ConfigError, match="LLMSHIM_RUN_OTEL_EXPORTER"):
        config.load({}, run_otel_exporter="console")
    with pytest.raises(config.ConfigError) as caught:
        config.load({}, no_such_setting=1)
    assert "run_otel_exporter" not in str(caught.value) and "cache_url" in str(caught.value)


def test_llmshim_run_refuses_a_bad_exporter_before_the_program_starts() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSHIM_")}
    env.update(PYTHONPATH=str(ROOT), LLMSHIM_RUN_OTEL_EXPORTER="jaeger")
    done = subprocess.run([sys.executable, "-m", "llmshim", "run", "--", sys.executable, "-c", "print('started')"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "LLMSHIM_RUN_OTEL_EXPORTER" in done.stderr and "started" not in done.stdout


def test_llmshim_run_exports_spans_to_the_console() -> None:
    from llmshim.testing import FakeLLMServer

    program = ("import requests, sys\n"
               "r = requests.post(sys.argv[1] + '/v1/chat/completions', json={'model': 'm', "
               "'messages': [{'role': 'user', 'content': 'hi'}]})\n"
               "print('status', r.status_code)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSHIM_", "OTEL_"))}
    env.update(PYTHONPATH=str(ROOT), LLMSHIM_CACHE="off")
    with FakeLLMServer() as server:
        done = subprocess.run([sys.executable, "-m", "llmshim", "run", "--otel-exporter", "console", "--",
                               sys.executable, "-c", program, server.url], env=env, capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 0, done.stderr
    assert "status 200" in done.stdout and '"gen_ai.request.model": "m"' in done.stdout
