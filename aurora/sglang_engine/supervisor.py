"""Supervisor of the SGLang server process: detects a crash (the process, or one of its schedulers, exited)
or a hang (requests in flight and no response bytes for `hang_s`), fails every in-flight request with a clear
503 at once instead of letting it hang, restarts SGLang with the current draft, and resumes: capture
reconnects (the schedulers dial the collector again when they load the draft) and step swaps continue
(the new ranks apply the latest published version from the shared buffers). Restarts are counted; while one
runs /health answers 503 with the reason; after `max_restarts` failed attempts in a row the engine stays
"failed".
"""
import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, engine, poll_s: float = 1.0, hang_s: float = 120.0, max_restarts: int = 3,
                 ready_timeout_s: float = 900.0, draft_for_restart: Callable[[], tuple[str | None, int]] | None = None):
        """draft_for_restart() -> (directory of the draft SGLang should load, its version); None: the draft
        the server was started with, version unchanged."""
        self.engine, self.poll_s, self.hang_s = engine, poll_s, hang_s
        self.max_restarts, self.ready_timeout_s = max_restarts, ready_timeout_s
        self.draft_for_restart = draft_for_restart
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aurora-sglang-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def fault(self) -> str | None:
        """Why the server cannot serve now, or None."""
        e, server = self.engine, self.engine.server
        if not server.alive():
            return f"SGLang exited with code {server.proc.returncode}"
        dead = server.dead_child()
        if dead:
            return dead
        idle = time.monotonic() - e.last_progress
        if e.running_requests() and idle > self.hang_s:
            return f"SGLang hung: no response for {idle:.0f} s with {e.running_requests()} request(s) in flight"
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.engine.stopping:
                return
            reason = self.fault()
            if reason is not None and not self.engine.stopping:
                self._recover(reason)

    def _recover(self, reason: str) -> None:
        e = self.engine
        log.error("%s; failing in-flight requests and restarting SGLang (see %s)", reason, e.server.log_path)
        e.on_fault(reason)
        for attempt in range(1, self.max_restarts + 1):
            if self._stop.is_set() or e.stopping:
                return
            try:
                draft_dir, version = self.draft_for_restart() if self.draft_for_restart else (None, e.draft_version)
                t0 = time.monotonic()
                e.server.restart(draft_dir)
                e.server.wait_ready(self.ready_timeout_s)
            except Exception as err:
                log.error("SGLang restart %d of %d failed: %s", attempt, self.max_restarts, err)
                continue
            e.on_restarted(version)
            log.warning("SGLang restarted in %.0f s with draft version %d after: %s (%d restart(s) so far)",
                        time.monotonic() - t0, version, reason, e.restarts)
            return
        e.on_failed(f"{reason}; {self.max_restarts} restart attempts failed (see {e.server.log_path})")
        log.error("SGLang could not be restarted: serving is down; restart the service")
