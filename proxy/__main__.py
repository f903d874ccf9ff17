"""Command line: flags > environment > config file > built-in defaults.

The only place a ConfigError becomes exit code 2 and a StartupError exit code 3.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
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
_SETTINGS: tuple[tuple[str, str | None, tuple[str, ...], str], ...] = (
    ("--host", "PROXY_HOST", ("listen", "host"), "traffic listener address"),
    ("--port", "PROXY_PORT", ("listen", "port"), "traffic listener port"),
    ("--admin-port", "PROXY_ADMIN_PORT", ("admin", "port"), "admin listener port: /metrics /healthz /readyz"),
    ("--upstream", "PROXY_UPSTREAM_URL", ("upstream", "url"), "upstream base URL"),
    ("--workers", "PROXY_WORKERS", ("workers",), "worker processes"),
    ("--log-level", "PROXY_LOG_LEVEL", ("log", "level"), ", ".join(get_args(cfg.LogLevel))),
    ("--log-format", None, ("log", "format"), ", ".join(get_args(cfg.LogFormat))),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A resilience proxy for the OpenAI API.")
    p.add_argument("--config", metavar="PATH",
                   help=f"YAML config file (env PROXY_CONFIG; default {SYSTEM_CONFIG} when it exists)")
    for flag, var, keys, text in _SETTINGS:  # the defaults shown are proxy/default.yaml's
        env = f"env {var}; " if var else ""
        metavar = "N" if flag == "--workers" else keys[-1].upper()
        p.add_argument(flag, metavar=metavar, help=f"{text} ({env}default {cfg.builtin_value(keys)})")
    p.add_argument("--check-config", action="store_true", help="validate, print the effective config, exit")
    return p


def load_config(args: argparse.Namespace, env: dict[str, str]) -> cfg.ProxyConfig:
    """Flags > environment > config file > proxy/default.yaml."""
    overrides: list[cfg.Override] = [(var, keys, env[var]) for _, var, keys, _ in _SETTINGS if var and env.get(var)]
    overrides += [(flag, keys, value) for flag, _, keys, _ in _SETTINGS
                  if (value := getattr(args, flag[2:].replace("-", "_"))) is not None]
    path = args.config or env.get("PROXY_CONFIG") or (SYSTEM_CONFIG if os.path.isfile(SYSTEM_CONFIG) else None)
    return cfg.load(path, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args, dict(os.environ))
    except cfg.ConfigError as exc:
        print(f"{PROG}: config error: {mask(str(exc))}", file=sys.stderr)  # a bad value may hold a key
        return 2
    if args.check_config:
        print(f"# effective config ({config.source}): valid")
        print(yaml.safe_dump(mask_value(cfg.effective(config)), sort_keys=False), end="")
        return 0
    configure(config.log.level, config.log.format)
    try:
        run_loop(serve(config, Supervisor if config.workers > 1 else None))
    except StartupError as exc:
        print(f"{PROG}: {mask(str(exc))}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
