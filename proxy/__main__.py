"""Command line: flags > environment > config file > built-in defaults.

The only place a ConfigError becomes exit code 2 and a StartupError exit code 3.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import get_args

import yaml

from . import config as cfg
from .logs import configure
from .masking import mask, mask_value
from .server import StartupError, run_loop, serve
from .workers import Supervisor

PROG = "openai-resilience-proxy"
# Read when no --config or PROXY_CONFIG is given and the file exists (the container image's mount point).
SYSTEM_CONFIG = "/etc/openai-resilience-proxy/config.yaml"

# (flag, environment variable, config key path, help); each value is checked by the config's schema
_SETTINGS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("--host", "PROXY_HOST", ("listen", "host"), "traffic listener address"),
    ("--port", "PROXY_PORT", ("listen", "port"), "traffic listener port"),
    ("--admin-port", "PROXY_ADMIN_PORT", ("admin", "port"), "admin listener port: /metrics /healthz /readyz"),
    ("--upstream", "PROXY_UPSTREAM_URL", ("upstream", "url"), "upstream base URL"),
    ("--workers", "PROXY_WORKERS", ("workers",), "worker processes"),
    ("--log-level", "PROXY_LOG_LEVEL", ("log", "level"), ", ".join(get_args(cfg.LogLevel))),
    ("--log-format", "PROXY_LOG_FORMAT", ("log", "format"), ", ".join(get_args(cfg.LogFormat))),
)
_VARIABLES = ("PROXY_CONFIG", *(var for _, var, _, _ in _SETTINGS))
# A misspelling is judged without the shared PROXY_ prefix (it would make every name look close), against
# each variable's own name and what a user guesses from its flag or config key (PROXY_UPSTREAM, PROXY_LISTEN_PORT).
_SPELLINGS = {var[6:]: var for var in _VARIABLES} | {
    guess: var for flag, var, keys, _ in _SETTINGS
    for guess in (flag[2:].replace("-", "_").upper(), "_".join(keys).upper()) if guess != var[6:]}
# One-off commands have no twin: set in a Deployment's environment, one would end every pod at once.
_COMMANDS = {"PROXY_CHECK_CONFIG": "--check-config"}
# What Kubernetes injects for a Service named `proxy` when the pod has service links on (sidecar mode)
_SERVICE_LINK = re.compile(r"PROXY_(SERVICE_(HOST|PORT)|PORT_\d+_(TCP|UDP|SCTP))\w*")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A resilience proxy for the OpenAI API.")
    p.add_argument("--config", metavar="PATH",
                   help=f"YAML config file (env PROXY_CONFIG; default {SYSTEM_CONFIG} when it exists)")
    for flag, var, keys, text in _SETTINGS:  # the defaults shown are proxy/default.yaml's
        metavar = "N" if flag == "--workers" else keys[-1].upper()
        p.add_argument(flag, metavar=metavar, help=f"{text} (env {var}; default {cfg.builtin_value(keys)})")
    p.add_argument("--check-config", action="store_true",
                   help="validate, print the effective config, exit (a command: no env twin)")
    return p


def load_config(args: argparse.Namespace, env: dict[str, str]) -> cfg.ProxyConfig:
    """Flags > environment > config file > proxy/default.yaml."""
    overrides: list[cfg.Override] = [(var, keys, env[var]) for _, var, keys, _ in _SETTINGS if env.get(var)]
    overrides += [(flag, keys, value) for flag, _, keys, _ in _SETTINGS
                  if (value := getattr(args, flag[2:].replace("-", "_"))) is not None]
    path = args.config or env.get("PROXY_CONFIG") or (SYSTEM_CONFIG if os.path.isfile(SYSTEM_CONFIG) else None)
    return cfg.load(path, overrides)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """One warning per PROXY_* name that is no setting: a misspelt one was ignored without a word
    (PROXY_UPSTREAM=... and the proxy went to api.openai.com). Names only: a value may be a secret."""
    warnings, links = [], []
    for name in sorted(env):
        upper = name.upper()  # proxy_port is ignored too (names are case-sensitive): suggest PROXY_PORT
        if not upper.startswith("PROXY_") or name in _VARIABLES:
            continue
        if _SERVICE_LINK.fullmatch(name):
            links.append(name)
            continue
        if upper in _COMMANDS:
            hint = f"{_COMMANDS[upper]} is a command with no environment twin; pass the flag"
        elif close := difflib.get_close_matches(upper[6:], _SPELLINGS, n=1):
            hint = f"did you mean {_SPELLINGS[close[0]]}?"
        else:
            hint = "ignored (--help lists the PROXY_* variables)"
        warnings.append(f"{name if name.isprintable() else ascii(name)} is not a setting; {hint}")
    if links:  # several per Service: one line
        warnings.append(f"{', '.join(links)}: Kubernetes service links for a Service named proxy, not settings;"
                        " ignored (enableServiceLinks: false drops them)")
    return warnings


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    for warning in unknown_variables(env):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    try:
        config = load_config(args, env)
    except cfg.ConfigError as exc:
        print(f"{PROG}: config error: {mask(str(exc))}", file=sys.stderr)  # a bad value may hold a key
        return 2
    if args.check_config:
        print(f"# effective config ({config.source}): valid")
        print(yaml.safe_dump(mask_value(cfg.effective(config)), sort_keys=False), end="")
        return 0
    configure(config.log.level, config.log.format)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() installs the reload: nothing to reload yet
    try:
        run_loop(serve(config, Supervisor if config.workers > 1 else None, lambda: load_config(args, env)))
    except StartupError as exc:
        print(f"{PROG}: {mask(str(exc))}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
