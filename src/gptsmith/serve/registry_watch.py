"""`gptsmith serve --registry DIR`: serve the registry's live version, and switch to a newly promoted one without
a restart and without dropping a request.

A background thread polls registry.json (gptsmith.registry; every change to it is one atomic rename, so a read
sees the old file or the new one). When the live version changes, the thread loads the new version (the slow
part, off the event loop), then on the event loop the new backend takes the old one's place in the server's list
of served models. A request picks its Served entry once, at the start (Server.check_model), and uses that entry's
backend to the end: requests already under way finish on the old engine, new ones go to the new one. The old
backend is closed once every HTTP request that began before the switch has ended (RequestEpochs counts them), and
its weights are freed when nothing refers to them any more.

A promoted version that fails to load (a damaged config.json, missing weights, too big for the device) leaves the
old version serving and is logged; it is tried again when registry.json changes again. Polling needs no extra
dependency and works on every file system (network mounts included).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

from gptsmith.errors import InputError
from gptsmith.registry import Registry

log = logging.getLogger("gptsmith.serve")


class RequestEpochs:
    """How many HTTP requests are under way, by the epoch they began in; a switch starts a new epoch. Everything
    here runs on the event loop (no locks needed)."""

    def __init__(self):
        self.epoch = 0
        self.open: Counter[int] = Counter()

    def enter(self) -> int:
        self.open[self.epoch] += 1
        return self.epoch

    def leave(self, epoch: int) -> None:
        self.open[epoch] -= 1
        if self.open[epoch] <= 0:
            del self.open[epoch]

    def advance(self) -> int:
        """Start a new epoch; returns it. Requests that began before it may hold what the switch replaced."""
        self.epoch += 1
        return self.epoch

    async def drained(self, epoch: int, poll: float = 0.05) -> None:
        """Wait until no request that began before `epoch` is under way."""
        while any(e < epoch for e in self.open):
            await asyncio.sleep(poll)


class InFlight:
    """ASGI middleware: counts each HTTP request in RequestEpochs from its start until its response (a stream
    included) has ended, however it ends."""

    def __init__(self, app, epochs: RequestEpochs):
        self.app, self.epochs = app, epochs

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        epoch = self.epochs.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.epochs.leave(epoch)


def load_version(cfg, registry: Registry, version: str):
    """A LocalBackend for `version`, served under the registry's name; the stored model_version is the id."""
    from gptsmith.serve.app import build_backend

    return build_backend(cfg, registry.version_dir(version), name=registry.name, version=version)


@dataclass
class RegistryWatcher:
    """Serves the live version of `registry` and follows registry.json every `seconds`. `check()` does one round
    now (tests call it); `switches` lists (old, new) of every switch, `released` the versions whose backend has been
    closed, `failed` version -> why it could not be loaded."""
    cfg: object
    registry: Registry
    seconds: float
    backend: object = None  # the live version's backend (loaded by open)
    live: str | None = None
    epochs: RequestEpochs = field(default_factory=RequestEpochs)
    switches: list = field(default_factory=list)
    released: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    srv: object = None
    _seen: bytes | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _retiring: set = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, cfg) -> RegistryWatcher:
        """Load the live version of cfg.serve.registry; a clear error when there is none or it cannot load."""
        registry = Registry.open(cfg.serve.registry)
        w = cls(cfg, registry, cfg.serve.registry_seconds)
        w._seen = w.registry.file.read_bytes()
        live = registry.live()
        if live is None:
            raise InputError(f"registry {registry.root} has no live version to serve; promote one first: "
                             f"`gptsmith models promote VERSION --registry {registry.root}` "
                             f"(`gptsmith models list --registry {registry.root}` lists them)")
        try:
            w.backend = load_version(cfg, registry, live)
        except Exception as e:
            raise InputError(f"the live version {live} of registry {registry.root} does not load ({e}); roll back "
                             f"(`gptsmith models rollback --registry {registry.root}`) or promote another "
                             "version") from e
        w.live = live
        return w

    def attach(self, srv) -> None:
        self.srv = srv
        srv.registry_watcher = self

    def served(self):
        """The server's entry for the registry's model (the one whose backend is the live version's)."""
        return next(s for s in self.srv.served if s.backend is self.backend)

    # ------------------------------------------------------------------------------------------ one round
    def check(self) -> str | None:
        """Look at registry.json once; when the live version changed, load it and switch. Returns the version
        switched to, or None."""
        with self._lock:  # one round at a time (the thread and a caller)
            try:
                raw = self.registry.file.read_bytes()
            except OSError as e:
                log.error("cannot read %s (%s); serving %s", self.registry.file, e, self.live)
                return None
            if raw == self._seen:
                return None
            self._seen = raw
            try:
                live = self.registry.read().get("live")
            except InputError as e:
                log.error("%s; serving %s", e, self.live)
                return None
            if live is None or live == self.live:
                if live is None:
                    log.warning("registry %s has no live version now; still serving %s", self.registry.root,
                                self.live)
                return None
            return self._load_and_switch(live)

    def _load_and_switch(self, version: str) -> str | None:
        log.info("registry %s: %s is live; loading it (still serving %s)", self.registry.root, version, self.live)
        try:
            backend = load_version(self.cfg, self.registry, version)
        except Exception as e:  # never a dead server: the old version goes on answering
            self.failed[version] = f"{type(e).__name__}: {e}"
            log.error("version %s of registry %s does not load (%s); still serving %s. Fix it and promote again, "
                      "or roll back.", version, self.registry.root, self.failed[version], self.live)
            return None
        try:
            asyncio.run_coroutine_threadsafe(self._switch(backend, version), self._loop).result()
        except Exception as e:
            self.failed[version] = f"{type(e).__name__}: {e}"
            log.exception("switching to version %s of registry %s failed; still serving %s", version,
                          self.registry.root, self.live)
            return None
        return version

    async def _switch(self, backend, version: str) -> None:
        from gptsmith.serve.server import Served

        await backend.start()
        old = self.served()
        self.srv.replace_served(old, Served(backend))
        previous, self.backend, self.live = self.live, backend, version
        self.switches.append((previous, version))
        epoch = self.epochs.advance()
        task = asyncio.create_task(self._retire(old.backend, previous, epoch))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        log.info("now serving %s of registry %s (was %s; it finishes the requests it has)", version,
                 self.registry.root, previous)

    async def _retire(self, backend, version: str, epoch: int) -> None:
        try:
            await self.epochs.drained(epoch)
            log.info("releasing %s of registry %s: its last request has ended", version, self.registry.root)
        finally:  # at shutdown too (cancelled): its scheduler thread stops
            await backend.close()
            self.released.append(version)

    # ------------------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                self.check()
            except Exception:  # a bug or a closing loop must not end the watch silently
                log.exception("watching registry %s failed; trying again", self.registry.root)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gptsmith-registry-watch", daemon=True)
            self._thread.start()
            log.info("serving %s of registry %s as '%s'; watching it every %ss", self.live, self.registry.root,
                     self.registry.name, self.seconds)

    async def stop(self) -> None:
        """Stop watching and close the backends still finishing their requests (the live one is the server's)."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

