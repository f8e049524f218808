"""The server's state, without HTTP: sessions, jobs, the fair queue in front of the one model, the
rate limit. :mod:`.server` puts FastAPI in front of it; everything here is plain threads.

* A **session** holds one uploaded volume (its raw ``(z, y, x)`` voxels) for the token that
  uploaded it. It expires after ``session_ttl`` seconds without a request; a client then uploads
  again (:class:`~MedSAMSlicerLib.remote.client.RemoteSegmenter` does so by itself).
* A **job** is one engine call on a session (a box, several structures, a correction). Jobs wait in
  a :class:`FairQueue`: one queue per session, served round-robin, so a session with many jobs
  never starves another. One worker thread runs them on the one
  :class:`~MedSAMSlicerLib.segmenter.Segmenter` (one model, one device): the same code as a local run.
* Embeddings: the segmenter's embedding cache, keyed by the owner's token digest, volume, window,
  model and slice. Each session keeps its embeddings under its own cap (``session_cache_mb``): a
  session over it loses its own least recently used ones, never another session's, and computes
  them again when it needs them (the same masks, only slower). Above the sessions, one ceiling
  (``cache_mb``) for all of them. An embedding belongs to the session that used it last, so a
  user's next session on the same volume (the command line opens one per run) finds the
  embeddings of the last one (:class:`~MedSAMSlicerLib.segmentation.memory.MemoryLRU`).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import MedSAMError
from ..progress import Cancelled, CancelToken


@dataclass
class Limits:
    """What the server accepts (``medsam-slicer serve`` options)."""

    max_sessions: int = 16
    session_ttl: float = 900.0
    max_upload_mb: int = 256
    max_volume_mb: int = 1024
    rate_limit: float = 50.0
    max_queued_per_session: int = 4
    job_keep_s: float = 120.0
    #: Slice embeddings of all sessions together (MiB; least recently used out).
    cache_mb: int = 4096
    #: Slice embeddings of one session (MiB; its own least recently used out): 4 MiB a slice.
    session_cache_mb: int = 1024


def log(text: str) -> None:
    """One line (or a traceback) into the server's log (its standard error). A log that cannot be
    written (its disk full, its pipe closed) loses the text; it never stops the server (an
    ``OSError`` raised from here would end the worker thread, and every job after it would wait
    forever)."""
    try:
        print(text.rstrip("\n"), file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def owner_of(token: Optional[str]) -> str:
    """Who a token is, as the server keeps it (a digest: tokens themselves are never stored)."""
    return hashlib.sha256((token or "").encode()).hexdigest()[:24]


def check_token(given: Optional[str], tokens: Sequence[str]) -> Optional[str]:
    """The owner of ``given`` if it is one of ``tokens`` (constant-time comparisons, every token
    compared), else ``None``."""
    if given is None:
        return None
    match = False
    for token in tokens:
        match |= hmac.compare_digest(given.encode(), token.encode())
    return owner_of(given) if match else None


class RateLimiter:
    """A token bucket per owner: ``rate`` requests a second, bursts of ``2 * rate``."""

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, 2.0 * self.rate)
        self._buckets: Dict[str, Tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, owner: str) -> float:
        """0 when the request may go, else the seconds to wait."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            level, then = self._buckets.get(owner, (self.burst, now))
            level = min(self.burst, level + (now - then) * self.rate)
            if level >= 1.0:
                self._buckets[owner] = (level - 1.0, now)
                return 0.0
            self._buckets[owner] = (level, now)
            return (1.0 - level) / self.rate


@dataclass
class Session:
    """One uploaded volume, for one owner."""

    id: str
    owner: str
    array: np.ndarray
    sha256: str
    last_used: float = field(default_factory=time.monotonic)
    queued: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


@dataclass
class Job:
    """One engine call and how far it got."""

    id: str
    session: Session
    kind: str
    run: Callable[..., Any]
    state: str = "queued"  # queued, running, done, failed, cancelled
    done: int = 0
    total: int = 0
    message: str = ""
    answer: Optional[Dict[str, Any]] = None
    error: str = ""
    finished_at: float = 0.0
    started_at: float = 0.0
    cancel: CancelToken = field(default_factory=CancelToken)
    version: int = 0

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.done, self.total, self.message = int(done), int(total), str(message)
        self.version += 1

    def finish(self, state: str, answer: Optional[Dict[str, Any]] = None, error: str = "") -> None:
        self.answer, self.error, self.finished_at = answer, error, time.monotonic()
        self.state = state
        self.version += 1

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def status(self, position: int) -> Dict[str, Any]:
        out: Dict[str, Any] = {"job": self.id, "state": self.state, "done": self.done, "total": self.total,
                               "message": self.message}
        if self.state == "queued":
            out["position"] = position
        if self.state == "done":
            out["result"] = self.answer
            out["run_s"] = self.finished_at - self.started_at  # the engine's time, without the network
        if self.state == "failed":
            out["error"] = self.error
        return out


class FairQueue:
    """Jobs in one queue per session, taken round-robin across sessions."""

    def __init__(self) -> None:
        self._queues: collections.OrderedDict[str, Deque[Job]] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job: Job) -> None:
        with self._cond:
            self._queues.setdefault(job.session.id, collections.deque()).append(job)
            self._cond.notify()

    def get(self) -> Optional[Job]:
        """The next job (blocks); ``None`` once closed. The session served goes to the back."""
        with self._cond:
            while not self._queues and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            sid, queue = next(iter(self._queues.items()))
            job = queue.popleft()
            del self._queues[sid]
            if queue:
                self._queues[sid] = queue  # back of the line
            return job

    def position(self, job: Job) -> int:
        """Jobs ahead of ``job`` (round-robin order), 0 when it is next."""
        with self._cond:
            queue = self._queues.get(job.session.id)
            if queue is None or job not in queue:
                return 0
            rank = list(queue).index(job)
            sessions = len(self._queues)
            order = list(self._queues)
            mine = order.index(job.session.id)
            return rank * sessions + mine

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Service:
    """Sessions, jobs and the worker that runs them on ``segmenter`` (a loaded
    :class:`~MedSAMSlicerLib.segmenter.Segmenter`)."""

    def __init__(self, segmenter, limits: Limits) -> None:
        self.segmenter = segmenter
        self.limits = limits
        self.sessions: Dict[str, Session] = {}
        self.expired: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.jobs: Dict[str, Job] = {}
        self.queue = FairQueue()
        self.limiter = RateLimiter(limits.rate_limit)
        self._lock = threading.Lock()
        self._loaded: Optional[str] = None
        self.started = time.time()
        self.jobs_run = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="medsam-serve-worker", daemon=True)
        self._janitor = threading.Thread(target=self._sweep, name="medsam-serve-janitor", daemon=True)
        self._worker.start()
        self._janitor.start()

    # -- sessions --------------------------------------------------------------------------------
    def open_session(self, owner: str, array: np.ndarray, sha256: str) -> Session:
        with self._lock:
            if len(self.sessions) >= self.limits.max_sessions:
                raise LimitReached(f"the server holds {len(self.sessions)} sessions, its limit; try again when one "
                                   f"closes or expires (after {self.limits.session_ttl:g} s idle)", 503)
            session = Session(secrets.token_urlsafe(18), owner, array, sha256)
            self.sessions[session.id] = session
            return session

    def _drop(self, session: Session) -> None:
        """Forget ``session`` (under the lock); its embeddings go first when memory is needed."""
        self.sessions.pop(session.id, None)
        self.segmenter.embedding_cache.release(session.id)

    def session(self, sid: str, owner: str) -> Session:
        """The owner's session ``sid`` (touched: its idle time starts again).

        Raises:
            Missing: no such session for this owner (another owner's is "unknown" too), or expired.
        """
        with self._lock:
            session = self.sessions.get(sid)
            if session is None or not hmac.compare_digest(session.owner, owner):
                if sid in self.expired:
                    raise Missing("session_expired", "the session expired (idle too long); upload the volume again")
                raise Missing("session_unknown", "no such session on this server (it may have restarted); upload "
                                                 "the volume again")
            session.last_used = time.monotonic()
            return session

    def close_session(self, sid: str, owner: str) -> None:
        session = self.session(sid, owner)
        with self._lock:
            self._drop(session)

    def session_usage(self, sid: str, owner: str) -> Dict[str, Any]:
        """The owner's session ``sid``: its volume and the embeddings it holds
        (:meth:`~MedSAMSlicerLib.segmentation.memory.MemoryLRU.usage`)."""
        session = self.session(sid, owner)
        return {"session": session.id, "shape": list(session.array.shape), "queued": session.queued,
                "embeddings": self.segmenter.embedding_cache.usage(session.id)}

    # -- jobs ------------------------------------------------------------------------------------
    def submit(self, session: Session, kind: str, run: Callable[..., Any]) -> Job:
        with self._lock:
            if session.queued >= self.limits.max_queued_per_session:
                raise LimitReached(f"this session already has {session.queued} jobs waiting (at most "
                                   f"{self.limits.max_queued_per_session}); wait for them", 429)
            session.queued += 1
            job = Job(secrets.token_urlsafe(12), session, kind, run)
            self.jobs[job.id] = job
        self.queue.put(job)
        return job

    def job(self, jid: str, owner: str) -> Job:
        job = self.jobs.get(jid)
        if job is None or not hmac.compare_digest(job.session.owner, owner):
            raise Missing("job_unknown", "no such job on this server (it may have restarted)")
        job.session.last_used = time.monotonic()
        return job

    def _work(self) -> None:
        while not self._stop.is_set():
            job = self.queue.get()
            if job is None:
                return
            with self._lock:
                job.session.queued -= 1
            if job.cancel.cancelled:
                job.finish("cancelled")
                continue
            job.state, job.started_at = "running", time.monotonic()
            job.version += 1
            try:
                with self.segmenter.embedding_cache.working_for(job.session.id, self.limits.session_cache_mb << 20):
                    answer = job.run(self._load(job.session), job.progress, job.cancel)
                job.finish("done", answer)
            except Cancelled:
                job.finish("cancelled")
            except MedSAMError as exc:
                job.finish("failed", error=str(exc))
            except Exception as exc:  # noqa: BLE001  (the server goes on; the client gets the reason)
                log(traceback.format_exc())
                job.finish("failed", error=f"the server failed on this request ({type(exc).__name__}: {exc})")
            finally:
                self.jobs_run += 1
                with self._lock:
                    if job.session.id not in self.sessions:  # closed while its job ran
                        self.segmenter.embedding_cache.release(job.session.id)

    def _load(self, session: Session) -> Callable[[Any], Any]:
        """A function that gives the segmenter ``session``'s volume with a window, unless it holds it."""

        def load(window):
            # Embeddings are the owner's: another user's identical volume does not reuse them (nor
            # learn, from the time a job takes, that someone else works on this volume).
            volume = f"{session.owner}:{session.sha256}"
            key = f"{volume}|{window.key}"
            if self._loaded != key:
                self._loaded = None
                self.segmenter.set_volume(session.array, window, key=volume)
                self._loaded = key
            return self.segmenter

        return load

    def _sweep(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            with self._lock:
                for sid, session in list(self.sessions.items()):
                    if now - session.last_used > self.limits.session_ttl and session.queued == 0:
                        self._drop(session)
                        self.expired[sid] = now
                while len(self.expired) > 10000:
                    self.expired.popitem(last=False)
                for jid, job in list(self.jobs.items()):
                    if job.finished and now - job.finished_at > self.limits.job_keep_s:
                        del self.jobs[jid]

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            cache = self.segmenter.embedding_cache
            return {"sessions": len(self.sessions), "volume_bytes": sum(s.nbytes for s in self.sessions.values()),
                    "jobs_run": self.jobs_run, "running": sum(j.state == "running" for j in self.jobs.values()),
                    "embedding_bytes": int(cache.nbytes), "embedding_cap_bytes": int(cache.max_bytes),
                    "session_embedding_cap_bytes": int(self.limits.session_cache_mb) << 20}

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()


class Missing(Exception):
    """A session or job the owner does not have (HTTP 404 with ``code``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LimitReached(Exception):
    """A limit of the server (HTTP ``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

