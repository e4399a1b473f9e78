"""`gptsmith serve --watch`: keep every served assistant's RAG index up to date with its folder while serving.

A background thread polls: every `serve.watch_seconds` it runs rag.index.refresh(index_dir) for each served
index, which re-embeds only the files whose content changed and drops the chunks of deleted files. When a
refresh changed something, the assistants over that index get a freshly opened Retriever, so the next answer
searches the new chunks. Polling needs no extra dependency and works on every file system (network mounts
included, where change notifications often do not arrive).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

log = logging.getLogger("gptsmith.serve")


def changed(report: dict, previous: dict | None) -> bool:
    """Whether a refresh report (rag.index.build_index's) says the index changed: files new, changed or gone, or
    fewer files indexed than before (a file that became empty or unreadable loses its chunks)."""
    return bool(report.get("files_updated") or report.get("files_deleted")
                or (previous is not None and report.get("files_indexed") != previous.get("files_indexed")))


@dataclass
class IndexWatcher:
    """Refreshes each served index every `seconds`; `refresh_all()` does one round now (tests call it)."""
    served: list
    seconds: float
    rounds: int = 0  # finished polling rounds
    reports: dict = field(default_factory=dict)  # index dir -> its last refresh report
    history: list = field(default_factory=list)  # (index dir, report) of every refresh that changed the index
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def index_dirs(self) -> list[str]:
        return sorted({s.index_dir for s in self.served if s.index_dir})

    def refresh_all(self) -> dict[str, dict]:
        """One round: refresh every index, reopen the retrievers of those that changed; returns the reports."""
        from gptsmith.rag.index import refresh

        with self._lock:  # one round at a time (the thread and a caller)
            reports = {}
            for index_dir in self.index_dirs():
                try:
                    report = refresh(index_dir, embedder=self._embedder(index_dir))
                except Exception:  # a file being written, a disk hiccup: the next round tries again
                    log.exception("refreshing the index %s failed; serving its previous state", index_dir)
                    continue
                reports[index_dir] = report
                if changed(report, self.reports.get(index_dir)):
                    self._reopen(index_dir)
                    self.history.append((index_dir, report))
                    log.info("index %s refreshed: %s file(s) new or changed (%s chunks embedded), %s deleted",
                             index_dir, report.get("files_updated"), report.get("chunks_embedded"),
                             report.get("files_deleted"))
            self.reports.update(reports)
            self.rounds += 1
            return reports

    def _embedder(self, index_dir: str):
        """The embedder the served retriever of `index_dir` already holds: a refresh must not load a second copy
        of its weights every round."""
        for s in self.served:
            if s.index_dir == index_dir and getattr(s.assistant, "retriever", None) is not None:
                return s.assistant.retriever.embedder
        return None

    def _reopen(self, index_dir: str) -> None:
        from gptsmith.rag.retrieve import Retriever

        for s in self.served:
            if s.index_dir == index_dir and s.assistant is not None:
                old = s.assistant.retriever  # same embedder: no second copy of its weights
                rerank = s.assistant.profile.rag.rerank
                s.assistant.retriever = Retriever.open(index_dir, rerank=str(rerank) if rerank else None,
                                                       embedder=getattr(old, "embedder", None))

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            self.refresh_all()

    def start(self) -> None:
        if not self.index_dirs():
            log.warning("watch is on, but no served assistant has a RAG index (rag.index): nothing to watch")
        elif self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gptsmith-index-watch", daemon=True)
            self._thread.start()
            log.info("watching %s every %ss", ", ".join(self.index_dirs()), self.seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
