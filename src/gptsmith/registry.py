"""A model registry: a folder of model versions, each a standard Hugging Face model directory with its lineage
(parent, method, data with hashes, config), its eval results and a status: candidate, live, retired or rejected
(refine found it no better than live; `gptsmith models prune` deletes rejected versions).

    REGISTRY/
      registry.json                 {"format": 1, "name": "<served model name>", "live": "v3" | null,
                                     "versions": {"v1": {"status": "retired", "created": ..., "parent": null,
                                                         "method": "sft", "weights_sha256": ...}, ...},
                                     "history": [{"at": ..., "event": "add|promote|rollback|reject|prune",
                                                  "version": "v3", "previous": "v2"}]}
      versions/v1/                  the model directory (gptsmith_lineage.json inside, eval/*.json results beside)
      versions/v1/gptsmith_version.json   {"version", "parent", "method", "created", "data": [{"path", "sha256"}],
                                           "config", "source", "weights_sha256"}

registry.json is the one source of truth for status: every change is one atomic write of it (gptsmith.files), so a
crash never leaves a half-promoted model, and `gptsmith serve --registry` (serve/registry_watch.py) switches to a
newly promoted version by watching that one file. Every read-modify-write holds an exclusive lock on REGISTRY/.lock
(fcntl.flock), so two commands changing the registry at once never lose an update. A version's directory is
written completely under a temporary name and renamed into place before registry.json names it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptsmith.errors import InputError
from gptsmith.files import atomic_write_json, read_json, sha256_file, weights_sha256

FORMAT = 1
REGISTRY_FILE = "registry.json"
VERSION_FILE = "gptsmith_version.json"
LOCK_FILE = ".lock"
STATUSES = ("candidate", "live", "retired", "rejected")
VERSION_ID = re.compile(r"^v(\d+)$")
LINEAGE_FILE = "gptsmith_lineage.json"  # gptsmith.model.LINEAGE_FILENAME; not imported from there: it loads torch


def read_lineage(model_dir: Path) -> dict:
    path = Path(model_dir) / LINEAGE_FILE
    try:
        return read_json(path) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); fix or delete it") from None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def version_number(version: str) -> int:
    m = VERSION_ID.match(version)
    return int(m.group(1)) if m else -1


def data_entries(data) -> list[dict]:
    """`data` (paths, or a lineage's data record) as [{"path", "sha256"}]: the exact files a version learned from."""
    if not data:
        return []
    if isinstance(data, dict):  # a lineage's record: sft {"path", "sha256"}; pretrain {"manifest", "manifest_sha256"}
        if data.get("manifest"):
            return [{"path": data["manifest"], "sha256": data.get("manifest_sha256")}]
        return [{"path": data.get("path"), "sha256": data.get("sha256")}] if data.get("path") else []
    entries = []
    for item in data:
        if isinstance(item, dict):
            entries += data_entries(item)
            continue
        path = Path(item)
        if not path.is_file():
            raise InputError(f"data file {path} does not exist; pass the files the model was trained on")
        entries.append({"path": str(path.resolve()), "sha256": sha256_file(path)})
    return entries


def weights_sha_or_none(model_dir) -> str | None:
    """files.weights_sha256, or None for a directory without weight files."""
    try:
        return weights_sha256(model_dir)
    except FileNotFoundError:  # a config-only directory (no weights yet) is still a version; it has no hash
        return None


def eval_summary(model_dir: Path) -> list[dict]:
    """One row per suite of each eval result (suite, primary metric, value) and one per compare result (win rate
    of A over B), from the version's eval/*.json; a file that cannot be read is a row that says why."""
    rows = []
    for path in sorted((model_dir / "eval").glob("*.json")):
        try:
            res = read_json(path)
            if res.get("kind") == "compare":
                rows.append({"file": path.name, "kind": "compare", "a": (res.get("a") or {}).get("name"),
                             "b": (res.get("b") or {}).get("name"), "n": res.get("n"),
                             "win_rate_a": res.get("win_rate_a"), "ci": res.get("ci")})
                continue
            for suite in res.get("suites") or []:
                primary = suite.get("primary")
                rows.append({"file": path.name, "kind": "eval", "suite": suite.get("name"), "metric": primary,
                             "value": (suite.get("metrics") or {}).get(primary), "n": suite.get("n")})
        except (OSError, ValueError, AttributeError, TypeError) as e:
            rows.append({"file": path.name, "kind": "unreadable", "error": str(e)})
    return rows


@dataclass
class Registry:
    root: Path

    # ------------------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root, create: bool = False, name: str | None = None) -> Registry:
        """The registry at `root`; with `create`, a new empty one when there is none (named `name`, default the
        folder's name: the model name `serve --registry` answers to)."""
        reg = cls(Path(root).resolve())
        if reg.file.is_file():
            state = reg.read()  # a clear error now for a file that is not a registry
            if name is not None and name != state.get("name"):
                raise InputError(f"registry {reg.root} is named '{state.get('name')}'; a name is given only to a new "
                                 "registry (leave --name out, or use another folder)")
            return reg
        if not create:
            raise InputError(f"{reg.root} is not a model registry ({REGISTRY_FILE} is missing); create one with "
                             f"`gptsmith models add MODEL_DIR --registry {root}`")
        if reg.root.exists() and not reg.root.is_dir():
            raise InputError(f"registry {reg.root} is a file; give a folder (new or holding {REGISTRY_FILE})")
        (reg.root / "versions").mkdir(parents=True, exist_ok=True)
        with reg.locked():
            if not reg.file.is_file():
                atomic_write_json(reg.file, {"format": FORMAT, "name": name or reg.root.name, "live": None,
                                             "versions": {}, "history": []})
        return reg

    @property
    def file(self) -> Path:
        return self.root / REGISTRY_FILE

    def read(self) -> dict:
        """registry.json, checked. Reads need no lock: every write replaces the whole file in one rename."""
        try:
            state = read_json(self.file)
        except FileNotFoundError:
            raise InputError(f"{self.file} is missing; is {self.root} a model registry?") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{self.file} is not valid JSON ({e}); restore it from a backup, or recreate it "
                             "from versions/*/gptsmith_version.json") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("versions"), dict):
            raise InputError(f"{self.file} is not a format-{FORMAT} gptsmith registry (needs format, name, live, "
                             "versions, history)")
        state.setdefault("history", [])
        return state

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive while changing registry.json: each open() is its own lock holder, so this also orders threads
        of one process."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _write(self, state: dict) -> None:
        atomic_write_json(self.file, state)

    # ------------------------------------------------------------------------------------------ reading
    @property
    def name(self) -> str:
        return self.read().get("name") or self.root.name

    def version_dir(self, version: str) -> Path:
        return self.root / "versions" / version

    def live(self) -> str | None:
        return self.read().get("live")

    def live_dir(self) -> Path | None:
        live = self.live()
        return self.version_dir(live) if live else None

    def versions(self) -> list[dict]:
        state = self.read()
        rows = [{"version": v, **meta, "path": str(self.version_dir(v))} for v, meta in state["versions"].items()]
        return sorted(rows, key=lambda r: version_number(r["version"]))

    def _known(self, state: dict, version: str) -> dict:
        if version not in state["versions"]:
            known = ", ".join(sorted(state["versions"], key=version_number)) or "none yet"
            raise InputError(f"registry {self.root} has no version '{version}' (it has: {known}); "
                             f"`gptsmith models list --registry {self.root}` lists them")
        return state["versions"][version]

    def show(self, version: str) -> dict:
        """Everything known about `version`: its registry entry, gptsmith_version.json, the model's lineage and
        a summary of its eval results."""
        state = self.read()
        entry = self._known(state, version)
        where = self.version_dir(version)
        meta = read_json(where / VERSION_FILE) if (where / VERSION_FILE).is_file() else {}
        return {"version": version, "path": str(where), "live": state.get("live") == version, **meta, **entry,
                "lineage": read_lineage(where), "eval": eval_summary(where)}

    # ------------------------------------------------------------------------------------------ changing
    def add(self, model_dir, parent: str | None = None, method: str | None = None, data=None,
            config: dict | None = None, move: bool = False, extra: dict | None = None) -> str:
        """Copy (or move) `model_dir` in as a new candidate version; returns its id ("v4"). Parent, method, data
        and config default to what the model's gptsmith_lineage.json says; `extra` goes into its registry.json
        entry (refine's run id and feedback cut-off)."""
        src = Path(model_dir)
        if not (src / "config.json").is_file():
            raise InputError(f"{src} is not a model directory (no config.json); pass the output folder of "
                             "pretrain, sft, dpo or kto")
        if src.resolve().is_relative_to(self.root / "versions"):  # refine's runs (REGISTRY/refine/) may be added
            raise InputError(f"{src} is a version of the registry {self.root}; add a model directory from outside "
                             "its versions/")
        if parent is not None:
            self._known(self.read(), parent)
        lineage = read_lineage(src)
        incoming = self.root / "versions" / f".incoming-{uuid.uuid4().hex[:12]}"
        incoming.parent.mkdir(parents=True, exist_ok=True)
        try:
            # the slow part, outside the lock: another command may change registry.json meanwhile
            if move:
                shutil.move(str(src), str(incoming))
            else:
                shutil.copytree(src, incoming, symlinks=False)
            meta = {"parent": parent, "method": method or lineage.get("stage"), "created": now(),
                    "data": data_entries(data if data is not None else lineage.get("data")),
                    "config": config if config is not None else lineage.get("config"),
                    "source": str(src.resolve()), "weights_sha256": weights_sha_or_none(incoming)}
            with self.locked():
                state = self.read()
                if parent is not None:
                    self._known(state, parent)
                version = f"v{self._next_number(state)}"
                atomic_write_json(incoming / VERSION_FILE, {"version": version, **meta})
                os.rename(incoming, self.version_dir(version))
                state["versions"][version] = {"status": "candidate", "created": meta["created"], "parent": parent,
                                              "method": meta["method"], "weights_sha256": meta["weights_sha256"],
                                              **(extra or {})}
                state["history"].append({"at": now(), "event": "add", "version": version, "previous": None})
                self._write(state)
                return version
        finally:
            if incoming.exists():  # failed before the rename: a moved model goes back where it was
                if move and not src.exists():
                    shutil.move(str(incoming), str(src))
                else:
                    shutil.rmtree(incoming, ignore_errors=True)

    def _next_number(self, state: dict) -> int:
        """One more than any version registry.json names or versions/ holds (a folder renamed in by an add that
        died before its registry.json write is never overwritten)."""
        taken = [version_number(v) for v in state["versions"]]
        taken += [version_number(ev.get("version") or "") for ev in state["history"]]  # pruned ones stay taken
        taken += [version_number(p.name) for p in (self.root / "versions").iterdir()]
        return max([0, *taken]) + 1

    def promote(self, version: str) -> dict:
        """Make `version` live (the live one becomes retired): one atomic write of registry.json. Promoting the
        live version changes nothing. Returns {"version", "previous", "changed", "message"}."""
        with self.locked():
            state = self.read()
            self._known(state, version)
            if state.get("live") == version:
                return {"version": version, "previous": version, "changed": False,
                        "message": f"{version} is already live in {self.root}; nothing to do"}
            if not (self.version_dir(version) / "config.json").is_file():
                raise InputError(f"{self.version_dir(version)} has no config.json: version {version} of {self.root} "
                                 "is damaged; add the model again (`gptsmith models add`) and promote the new version")
            previous = self._switch(state, version, "promote")
        return {"version": version, "previous": previous, "changed": True,
                "message": f"{version} is live" + (f" (was {previous}, now retired)" if previous else "")}

    def rollback(self) -> dict:
        """Make the version that was live before the current one live again."""
        with self.locked():
            state = self.read()
            lives = self.live_sequence(state)
            if len(lives) < 2:
                raise InputError(f"registry {self.root} has no earlier live version to roll back to (live: "
                                 f"{state.get('live') or 'none'}); promote a version instead: "
                                 f"`gptsmith models promote VERSION --registry {self.root}`")
            target = lives[-2]
            previous = self._switch(state, target, "rollback")
        return {"version": target, "previous": previous, "changed": True,
                "message": f"rolled back to {target} (was {previous}, now retired)"}

    def reject(self, version: str, run: str) -> None:
        """refine found `version` no better than live: status rejected, with the run that decided it. Only a
        candidate is rejected (a version promoted meanwhile by hand keeps its status)."""
        with self.locked():
            state = self.read()
            entry = self._known(state, version)
            if entry.get("status") != "candidate":
                return
            entry.update(status="rejected", rejected_by=run)
            state["history"].append({"at": now(), "event": "reject", "version": version, "previous": None,
                                     "run": run})
            self._write(state)

    def prune(self) -> list[str]:
        """Delete every rejected version (its folder and its registry.json entry; history keeps its events, so
        its number is never given out again). Returns the versions removed."""
        with self.locked():
            state = self.read()
            gone = sorted((v for v, e in state["versions"].items() if e.get("status") == "rejected"),
                          key=version_number)
            for v in gone:
                del state["versions"][v]
                state["history"].append({"at": now(), "event": "prune", "version": v, "previous": None})
            self._write(state)  # first: a crash below leaves a stray folder, never an entry without its model
        for v in gone:
            shutil.rmtree(self.version_dir(v), ignore_errors=True)
        return gone

    @staticmethod
    def live_sequence(state: dict) -> list[str]:
        """The live versions in the order they went live, each rollback undoing the last promotion."""
        lives: list[str] = []
        for ev in state["history"]:
            if ev.get("event") == "promote":
                lives.append(ev["version"])
            elif ev.get("event") == "rollback" and lives:
                lives.pop()
        return lives

    def _switch(self, state: dict, version: str, event: str) -> str | None:
        previous = state.get("live")
        if previous is not None and previous in state["versions"]:
            state["versions"][previous]["status"] = "retired"
        state["versions"][version]["status"] = "live"
        state["live"] = version
        state["history"].append({"at": now(), "event": event, "version": version, "previous": previous})
        self._write(state)
        return previous



# ---------------------------------------------------------------------------------------------- printing (CLI)
def print_versions(reg: Registry) -> None:
    from rich.console import Console
    from rich.table import Table

    state = reg.read()
    table = Table(title=f"{state.get('name')}: {reg.root}  (live: {state.get('live') or 'none'})")
    for col in ("version", "status", "created", "parent", "method", "eval results"):
        table.add_column(col)
    for row in reg.versions():
        n_eval = len(list((reg.version_dir(row["version"]) / "eval").glob("*.json")))
        status = f"[bold green]{row['status']}[/]" if row["status"] == "live" else row["status"]
        table.add_row(row["version"], status, row.get("created") or "", row.get("parent") or "",
                      row.get("method") or "", str(n_eval))
    Console().print(table)
    if not state["versions"]:
        print(f"no versions yet: `gptsmith models add MODEL_DIR --registry {reg.root}`")


def print_version(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{info['version']}[/] ({info.get('status')})  "
                  f"{info['path']}")
    facts = Table(show_header=False, box=None)
    lineage = info.get("lineage") or {}
    for key, value in (("created", info.get("created")), ("parent", info.get("parent")),
                       ("method", info.get("method")), ("added from", info.get("source")),
                       ("trained from", lineage.get("parent_model"))):
        facts.add_row(key, str(value) if value is not None else "")
    for d in info.get("data") or []:
        facts.add_row("data", f"{d.get('path')}  sha256 {str(d.get('sha256') or '?')[:16]}")
    for key, value in (lineage.get("metrics") or {}).items():
        facts.add_row(f"metric {key}", str(value))
    console.print(facts)
    rows = info.get("eval") or []
    if not rows:
        console.print(f"no eval results in {info['path']}/eval/ (`gptsmith eval --model {info['path']}` adds them)")
        return
    table = Table(title="eval results")
    for col in ("file", "suite / comparison", "metric", "value", "n"):
        table.add_column(col)
    for r in rows:
        if r["kind"] == "compare":
            ci = r.get("ci") or [None, None]
            table.add_row(r["file"], f"{r.get('a')} vs {r.get('b')}", "win rate A",
                          f"{r.get('win_rate_a')} [{ci[0]}, {ci[1]}]", str(r.get("n")))
        elif r["kind"] == "eval":
            table.add_row(r["file"], str(r.get("suite")), str(r.get("metric")), str(r.get("value")), str(r.get("n")))
        else:
            table.add_row(r["file"], "unreadable", "", r.get("error", ""), "")
    console.print(table)
