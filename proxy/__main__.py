"""Command line: flags > environment > config file > built-in defaults.

The only place a ConfigError becomes exit code 2 and a StartupError exit code 3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import yaml

from . import config as cfg
from .logs import configure
from .masking import mask, mask_value
from .server import serve
from .workers import StartupError, Supervisor

PROG = "openai-resilience-proxy"
# Read when no --config or PROXY_CONFIG is given and the file exists (the container image's mount point).
SYSTEM_CONFIG = "/etc/openai-resilience-proxy/config.yaml"

# (flag dest, environment variable, config key path)
_SETTINGS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("host", "PROXY_HOST", ("listen", "host")),
    ("port", "PROXY_PORT", ("listen", "port")),
    ("admin_port", "PROXY_ADMIN_PORT", ("admin", "port")),
    ("upstream", "PROXY_UPSTREAM_URL", ("upstream", "url")),
    ("workers", "PROXY_WORKERS", ("workers",)),
    ("log_level", "PROXY_LOG_LEVEL", ("log", "level")),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="A resilience proxy for the OpenAI API.")
    p.add_argument("--config", metavar="PATH",
                   help=f"YAML config file (env PROXY_CONFIG; default {SYSTEM_CONFIG} when it exists)")
    p.add_argument("--host", help="traffic listener address (env PROXY_HOST; default 127.0.0.1)")
    p.add_argument("--port", help="traffic listener port (env PROXY_PORT; default 8080)")
    p.add_argument("--admin-port", help="admin listener port: /metrics /healthz /readyz (env PROXY_ADMIN_PORT; default 9090)")
    p.add_argument("--upstream", metavar="URL", help="upstream base URL (env PROXY_UPSTREAM_URL; default https://api.openai.com)")
    p.add_argument("--workers", help="worker processes (env PROXY_WORKERS; default 1)")
    p.add_argument("--log-level", help="debug, info, warning or error (env PROXY_LOG_LEVEL; default info)")
    p.add_argument("--log-format", choices=("json", "console"), help="log format (default json)")
    p.add_argument("--check-config", action="store_true", help="validate, print the effective config, exit")
    return p


def load_config(args: argparse.Namespace, env: dict[str, str]) -> cfg.ProxyConfig:
    overrides: list[cfg.Override] = []
    for dest, var, keys in _SETTINGS:
        if env.get(var):
            overrides.append((var, keys, env[var]))
    for dest, var, keys in _SETTINGS:
        value = getattr(args, dest)
        if value is not None:
            overrides.append(("--" + dest.replace("_", "-"), keys, value))
    if args.log_format:
        overrides.append(("--log-format", ("log", "format"), args.log_format))
    path = args.config or env.get("PROXY_CONFIG") or (SYSTEM_CONFIG if os.path.isfile(SYSTEM_CONFIG) else None)
    return cfg.load(path, overrides)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
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
        if config.workers > 1:
            run_loop(Supervisor(config, argv).run(asyncio.Event()))
        else:
            run_loop(serve(config))
    except StartupError as exc:
        print(f"{PROG}: {mask(str(exc))}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    return 0


def run_loop(coro: object) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(coro)  # type: ignore[arg-type]
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
