"""Policy hot reload: on a change to the policy file or on SIGHUP, keeping the last good policy.

A reload compiles the file off the event loop, then swaps the application's Config in one
assignment, so every request sees either the old policy or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from watchfiles import Change, awatch

from . import audit, policyfile
from .errors import ConfigErrors
from .metrics import Metrics

if TYPE_CHECKING:
    from .state import State

log = logging.getLogger("jitgate.reload")

Result = Literal["ok", "unchanged", "error"]


class PolicyReloader:
    """Keep `state.config` on the newest valid policy read from `path`."""

    def __init__(
        self,
        state: State,
        path: Path,
        metrics: Metrics,
        audit_log: audit.AuditLog,
        *,
        watch: bool = True,
    ) -> None:
        self.state = state
        self.path = path
        self.metrics = metrics
        self.audit_log = audit_log
        self.watch = watch
        self._lock = asyncio.Lock()  # one reload at a time: each compares against the last
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._signalled: set[asyncio.Task[Result]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Publish the running version, then listen for SIGHUP and (if enabled) file changes."""
        self.metrics.policy_info.labels(self.state.config.policy.version).set(time.time())
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._loop = loop
        except (NotImplementedError, RuntimeError) as exc:  # not the main thread, or no signals
            log.info("SIGHUP policy reload unavailable here: %s", exc)
        if self.watch:
            self._watcher = asyncio.create_task(self._watch(), name="policy-watch")
            # One step lets the watcher register with the OS before start() returns, so an
            # edit made right after start-up is not missed.
            await asyncio.sleep(0)

    async def stop(self) -> None:
        """Stop listening and wait for any reload in progress."""
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGHUP)
            self._loop = None
        self._stop.set()  # the watcher polls this between its waits and ends within a step
        if self._watcher is not None:
            try:
                await asyncio.wait_for(self._watcher, 10)
            except TimeoutError:
                log.warning("policy watcher did not stop in time; cancelled")
            self._watcher = None
        if self._signalled:
            await asyncio.gather(*self._signalled, return_exceptions=True)

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reload_now("SIGHUP"), name="policy-reload")
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    def _is_policy_file(self, _change: Change, path: str) -> bool:
        return Path(path).name in self._trigger_names()

    def _trigger_names(self) -> set[str]:
        """Return the names in the policy's directory whose change can change the policy.

        The file itself, and, when it is a symlink into a sibling of the directory, that
        sibling: a Kubernetes ConfigMap volume holds `policy.yaml -> ..data/policy.yaml`
        and is updated by renaming a new `..data` symlink into place, which never touches
        `policy.yaml` itself. Read on each event, since the link can come and go.
        """
        names = {self.path.name}
        try:
            target = os.path.normpath(self.path.parent / os.readlink(self.path))
        except OSError:  # not a symlink, or gone
            return names
        inside = os.path.relpath(target, self.path.parent).split(os.sep)[0]
        if inside not in (os.curdir, os.pardir):
            names.add(inside)
        return names

    async def _watch(self) -> None:
        # Watch the directory, not the file: editors save by writing a new file and
        # renaming it over the old one, which would end a watch on the old file.
        try:
            async for _ in awatch(
                self.path.parent,
                watch_filter=self._is_policy_file,
                stop_event=self._stop,
                recursive=False,
            ):
                await self.reload_now("file-watch")
        except Exception as exc:  # e.g. the OS watch limit: SIGHUP still works
            log.error("policy file watching stopped: %s; SIGHUP still reloads", exc)

    async def reload_now(self, actor: str = "manual") -> Result:
        """Load the policy file and swap it in if it is valid and new; return what happened."""
        async with self._lock:
            try:
                new = await asyncio.to_thread(policyfile.load, self.path)
            except ConfigErrors as exc:
                return self._failed(actor, [str(e) for e in exc.errors])
            except Exception as exc:  # e.g. a file that is not UTF-8: still keep the old one
                return self._failed(actor, [f"{self.path}: {exc}"])
            # Read the config only now, after the last await, so a concurrent swap of another
            # part is kept by replace() rather than overwritten.
            old = self.state.config
            previous = old.policy.version
            if new.version == previous:
                self.metrics.policy_reloads.labels("unchanged").inc()
                log.info("policy reload (%s): version %s unchanged", actor, previous)
                return "unchanged"
            authorizer = dataclasses.replace(old.authorizer, policy=new)
            self.state.config = dataclasses.replace(old, authorizer=authorizer)
            self.metrics.policy_reloads.labels("ok").inc()
            self.metrics.policy_info.labels(new.version).set(time.time())
            self.metrics.policy_info.remove(previous)
            self.audit_log.emit(
                audit.record(
                    "policy.reloaded",
                    previous_version=previous,
                    policy_version=new.version,
                    file=str(self.path),
                    actor=actor,
                )
            )
            log.info("policy reloaded (%s): version %s -> %s", actor, previous, new.version)
            return "ok"

    def _failed(self, actor: str, errors: list[str]) -> Result:
        running = self.state.config.policy.version
        self.metrics.policy_reloads.labels("error").inc()
        log.error("policy reload (%s) failed; keeping version %s", actor, running)
        for err in errors:
            log.error("%s", err)
        self.audit_log.emit(
            audit.record(
                "policy.reload_failed",
                policy_version=running,
                errors=errors,
                file=str(self.path),
                actor=actor,
            )
        )
        return "error"
