"""Settings: one frozen object built from ``LLMSHIM_*`` environment variables and ``install(**overrides)``.

Every setting is declared once in ``OPTIONS`` (name, environment variable, parser, default, meaning).
That table drives parsing, the error messages, ``status()`` and the README's variable list, so a
new capability adds one row and nothing else. Overrides passed to ``install()`` win over the
environment; both go through the same parser, so ``install(enabled="no")`` and
``LLMSHIM_ENABLED=no`` are judged alike. A malformed value raises :class:`ConfigError` naming the
variable, the bad value and the accepted form, at ``install()`` time and never later inside a call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LIBRARIES", "OPTIONS", "ConfigError", "Option", "Settings", "load"]

#: Client libraries llmshim can patch, in the order they are reported.
LIBRARIES: tuple[str, ...] = ("httpx", "httpx2", "requests", "aiohttp")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting has a value llmshim cannot use; the message names the variable and the accepted form."""


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("one of 1/0, true/false, yes/no, on/off")


def _parse_libraries(raw: Any) -> frozenset[str]:
    items = [str(x) for x in raw] if isinstance(raw, (list, tuple, set, frozenset)) else str(raw).split(",")
    names = {item.strip().lower() for item in items if item.strip()}
    if names == {"all"}:
        return frozenset(LIBRARIES)
    if names == {"none"}:
        return frozenset()
    unknown = names - set(LIBRARIES)
    if unknown or not names:
        raise ValueError(f"'all', 'none' or a comma-separated list of {', '.join(LIBRARIES)}")
    return frozenset(names)


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its field name, environment variable, parser, default and meaning."""

    name: str
    env: str
    parse: Callable[[Any], Any]
    default: str
    accepted: str
    doc: str
    secret: bool = False


OPTIONS: tuple[Option, ...] = (
    Option(
        "enabled", "LLMSHIM_ENABLED", _parse_bool, "true", "true/false (also 1/0, yes/no, on/off)",
        "Master switch. `false` makes install() a no-op: nothing is patched.",
    ),
    Option(
        "libraries", "LLMSHIM_LIBRARIES", _parse_libraries, "all",
        f"all, none, or a comma-separated subset of {', '.join(LIBRARIES)}",
        "Which client libraries to patch. The OpenAI SDK 3.x rides on httpx2; openai<3 and ollama on httpx.",
    ),
    Option(
        "telemetry", "LLMSHIM_TELEMETRY", _parse_bool, "true", "true/false (also 1/0, yes/no, on/off)",
        "OpenTelemetry spans and metrics for every LLM call, through the application's providers.",
    ),
    Option(
        "stats_file", "LLMSHIM_STATS_FILE", lambda raw: _parse_path(raw), "", "a file path, or empty",
        "Where to write a JSON snapshot of llmshim.stats() (at most once a second and at exit), "
        "for `llmshim stats`. Empty: no file.",
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}


def _parse_path(raw: Any) -> str | None:
    text = str(raw).strip() if raw is not None else ""
    if not text:
        return None
    if "\0" in text:
        raise ValueError("a file path")
    return os.path.expanduser(text)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective configuration. Frozen: a new install() builds a new one and swaps it in whole."""

    enabled: bool = True
    libraries: frozenset[str] = frozenset(LIBRARIES)
    telemetry: bool = True
    stats_file: str | None = None

    def masked(self) -> dict[str, Any]:
        """The settings as plain values for display, secrets replaced by ``***``."""
        shown: dict[str, Any] = {}
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.secret and value:
                value = "***"
            elif isinstance(value, frozenset):
                value = sorted(value)
            shown[option.name] = value
        return shown


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment, then apply ``overrides`` (keyword names are field names).

    Raises ConfigError for an unknown override name or any value its parser rejects.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name in overrides:
            raw, source = overrides[option.name], f"install({option.name}=...)"
        elif option.env in env:
            raw, source = env[option.env], option.env
        else:
            raw, source = option.default, f"default of {option.env}"
        try:
            values[option.name] = option.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"{source}: invalid value {raw!r} for {option.env}; expected {exc or option.accepted}"
            ) from None
    unknown = sorted(set(overrides) - set(_BY_NAME))
    if unknown:
        raise ConfigError(
            f"install() got unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(_BY_NAME)}"
        )
    return Settings(**values)
