"""Loading settings: one frozen :class:`Settings` built from ``LLMSHIM_*`` environment variables and
``install(**overrides)``; each setting is declared once, in ``llmshim.settings``.

Overrides passed to ``install()`` win over the environment; both go through the same parser, so
``install(enabled="no")`` and ``LLMSHIM_ENABLED=no`` are judged alike. A malformed value raises
:class:`ConfigError` naming the variable, the bad value (scrubbed of credentials) and the accepted
form, at ``install()`` time and never later inside a call. Numbers are finite and inside a
documented range (``llmshim.values``); an ``LLMSHIM_*`` variable that is no setting is warned about,
naming the nearest one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from . import redact
from .settings import LIBRARIES, OPTIONS, Option, Settings, markdown_table
from .values import Number

__all__ = ["LIBRARIES", "OPTIONS", "ConfigError", "Option", "Settings", "load", "markdown_table", "read",
           "unknown_variables"]

log = logging.getLogger("llmshim")
redact.protect_logger()  # every llmshim log record is scrubbed of credentials from here on

_BY_NAME = {option.name: option for option in OPTIONS}


class ConfigError(ValueError):
    """A setting has a value llmshim cannot use; the message names the variable and the accepted form."""


def _shown(option: Option, raw: Any) -> str:
    """The rejected value as the error message shows it: scrubbed, and short."""
    try:
        value = raw if isinstance(raw, str) else repr(raw)
    except ValueError:  # an int too long to print
        return "(a number too long to show)"
    value = redact.scrub_setting_url(value) if option.secret else redact.scrub_text(value)
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _parse(option: Option, raw: Any, source: str) -> Any:
    try:
        return option.parse(raw)
    except (ValueError, TypeError, ArithmeticError) as exc:
        raise ConfigError(  # the value is shown scrubbed; the rest is llmshim's own text
            f"{source}: invalid value {_shown(option, raw)} for {option.env}; expected "
            f"{option.accepted if isinstance(option.parse, Number) else exc or option.accepted}"
        ) from None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``LLMSHIM_*`` variable (any case) that is no setting, naming the nearest one."""
    known = sorted(option.env for option in OPTIONS)
    warnings = []
    for name in sorted(environ):
        if not name.upper().startswith("LLMSHIM_") or name in known:
            continue
        import difflib  # only a process with a stray LLMSHIM_* variable pays for it

        nearest = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
        hint = f"did you mean {nearest[0]}?" if nearest else "see the list of LLMSHIM_* settings in the README"
        warnings.append(f"llmshim: unknown variable {name} is ignored; {hint}")
    return warnings


def read(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting from the environment alone (its default when unset); ConfigError if malformed."""
    option, env = _BY_NAME[name], os.environ if environ is None else environ
    if option.env in env:
        return _parse(option, env[option.env], option.env)
    return _parse(option, option.default, f"default of {option.env}")


def load(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the environment, then apply ``overrides`` (keyword names are field names).

    Raises ConfigError for an unknown override name or any value its parser rejects; logs a warning
    (``llmshim`` logger) for each unknown ``LLMSHIM_*`` variable.
    """
    env = os.environ if environ is None else environ
    unknown = sorted(set(overrides) - set(_BY_NAME))
    if unknown:
        raise ConfigError(
            f"install() got unknown setting(s) {redact.scrub_text(', '.join(unknown))}; "
            f"known settings: {', '.join(o.name for o in OPTIONS if not o.startup_only)}")
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name in overrides:
            if option.startup_only:
                raise ConfigError(f"install({option.name}=...): {option.env} is read as the interpreter starts "
                                  "(llmshim run); in code, pass install(tracer_provider=...) instead")
            values[option.name] = _parse(option, overrides[option.name], f"install({option.name}=...)")
        else:
            values[option.name] = read(option.name, env)
    for warning in unknown_variables(env):
        log.warning("%s", warning)
    return Settings(**values)
