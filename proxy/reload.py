"""Hot reload: what a reload may change in a running process, and the Reloader that re-reads the
config on SIGHUP or when its file changes (server.serve installs it)."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from typing import Any

from msgspec.structs import replace
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

from .config import ConfigError, ProxyConfig, effective
from .logs import get_logger
from .masking import mask

Loader = Callable[[], ProxyConfig]  # re-reads the config as at startup: the file, the environment, the flags

# What a running process cannot change: its sockets, its processes, its log setup and its drain timer.
RESTART_KEYS = ("listen.host", "listen.port", "listen.max_connections", "admin.host", "admin.port", "workers",
                "shutdown_grace", "log.level", "log.format")


def changed_keys(old: ProxyConfig, new: ProxyConfig) -> list[str]:
    """The top-level sections (or, for the RESTART_KEYS, the keys) whose effective values differ."""
    a, b = effective(old), effective(new)
    out = [key for key in RESTART_KEYS if _at(a, key) != _at(b, key)]
    out += [key for key in b if key not in ("listen", "admin", "log", *RESTART_KEYS) and a.get(key) != b[key]]
    return out + (["credentials"] if old.credentials != new.credentials else [])  # a rotated secret: named, not shown


def pinned(new: ProxyConfig, running: ProxyConfig) -> ProxyConfig:
    """`new` as a running process applies it: with its running values of the RESTART_KEYS' sections."""
    return replace(new, listen=running.listen, admin=running.admin, log=running.log, workers=running.workers,
                   shutdown_grace=running.shutdown_grace)


def _at(tree: dict[str, Any], dotted: str) -> Any:
    return functools.reduce(lambda node, key: node[key], dotted.split("."), tree)


class Reloader:
    """Hot reload (SIGHUP, or the file watch): re-read and check the config, then hand a valid one to
    the traffic listener (this process's, or every worker); an invalid one changes nothing and is
    logged once, naming the file and key path."""

    def __init__(self, config: ProxyConfig, loader: Loader, apply: Callable[[ProxyConfig], None],
                 registry: CollectorRegistry) -> None:
        self.config, self._load, self._apply = config, loader, apply
        self._seen = self._signature()
        self.results = {"ok": 0, "failed": 0}  # both series exist from the start: an alert can use increase()
        registry.register(self)

    def reload(self, trigger: str) -> None:
        self._seen = self._signature()  # the file as this reload reads it: the watch waits for the next change
        try:
            config = self._load()
        except ConfigError as exc:
            self.results["failed"] += 1
            get_logger().error("config_reload_failed", trigger=trigger, error=mask(str(exc)), kept="the running config")
            return
        try:
            self._apply(config)
        except Exception as exc:  # a bug, not a bad file: say so, and keep serving on the old config
            self.results["failed"] += 1
            get_logger().exception("config_reload_failed", trigger=trigger, error=f"applying it failed: {exc!r}",
                                   kept="the running config")
            return
        self.results["ok"] += 1
        files = self._files()
        self.config = config
        if self._files() != files:  # another secret file: watch the new set from here
            self._seen = self._signature()

    def collect(self) -> list[CounterMetricFamily]:
        """openai_proxy_config_reloads_total{result}, a collector as the others (no _created series)."""
        family = CounterMetricFamily("openai_proxy_config_reloads", "Config reloads (SIGHUP or the file watch), "
                                     "by result.", labels=["result"])
        for result, n in self.results.items():
            family.add_metric([result], n)
        return [family]

    def _files(self) -> list[str]:
        """The config file and the secret files of injected credentials: what the watch looks at."""
        return [self.config.source, *(u.auth.value_from_file for u in self.config.upstreams.values()
                                      if u.auth is not None and u.auth.value_from_file is not None)]

    def _signature(self) -> tuple[int, ...] | None:
        """What changes when the config file or a secret file (auth.value_from_file) does: a ConfigMap or
        Secret volume swaps a symlink, so the inode changes."""
        seen: list[int] = []
        for path in self._files():
            try:
                st = os.stat(path)
            except OSError:  # no file (built-in defaults), or mid-swap: look again next time
                return None
            seen += [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size]
        return tuple(seen)

    async def watch(self) -> None:
        """While `reload.watch` is on, reload when the file changes (checked every `reload.interval`)."""
        while True:
            await asyncio.sleep(float(self.config.reload.interval))
            now = self._signature() if self.config.reload.watch else None
            if now is not None and now != self._seen:
                self.reload("file_changed")
