"""The client of ``medsam-slicer serve``: the standard library (``http.client``, ``ssl``) and numpy
only, no torch, so Slicer's Python needs no new package.

>>> seg = RemoteSegmenter("https://gpu.example.org:8765", token=os.environ["MEDSAM_SLICER_TOKEN"])
>>> seg.set_volume(ct_zyx, window)          # uploads the volume once (a session on the server)
>>> seg.segment(BoxPrompt(60, (30, 20, 70, 60)), "3d").mask   # as Segmenter.segment, run there

:class:`RemoteSegmenter` answers the calls the front ends make on a local
:class:`~MedSAMSlicerLib.segmenter.Segmenter` (``set_volume``, ``segment``, ``segment_structures``,
``correct``, ``describe``, and ``spec``, ``speed``, ``precision``, ``weights_sha256``, ``window`` for
the record), so ``segment_file``, ``replay_file`` and the Slicer bridge use it unchanged: the server
runs the same engine code, the client writes the same files with the same record.

Every failure becomes one :class:`~MedSAMSlicerLib.errors.MedSAMError` that names the server and
says what to do: nobody listening, a dropped connection, no answer in time, an untrusted
certificate, a refused token, another protocol version, a limit of the server. A session the server
no longer has (expired, or the server restarted) is opened again by itself, once per call; a job
lost in a restart runs again.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..boxes import BoxPrompt
from ..errors import MedSAMError
from ..progress import Cancelled, CancelToken, ProgressCallback
from ..segmentation.provenance import VERSION, volume_sha256
from ..segmentation.results import Correction, PropagationResult, Segmentation, StructuresResult
from . import protocol

#: The environment variable naming a CA bundle that signs the server's certificate (self-signed servers).
CA_ENV = "MEDSAM_SLICER_CA"
#: How long a job is waited on per poll (the server answers sooner when the job moves on).
POLL_WAIT_S = 0.25
#: Codes of the answers that mean "the session is gone": open it again.
_GONE = ("session_expired", "session_unknown", "job_unknown")


class RemoteError(MedSAMError):
    """An error answer of the server (``status``: the HTTP status, ``code``: the server's code)."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status, self.code = status, code


class Unreachable(MedSAMError):
    """No answer at all: nobody listening, the connection dropped, or no answer in time
    (``lost``: nobody listening or dropped, so it may come back, e.g. a restart)."""

    def __init__(self, message: str, lost: bool = False) -> None:
        super().__init__(message)
        self.lost = lost


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RemoteClient:
    """HTTP(S) requests to one server, with the protocol's headers and its errors in words.

    Args:
        url: ``http(s)://host:port`` (a path prefix is kept, e.g. behind a reverse proxy).
        token: the bearer token (``None``: a server without tokens, on loopback).
        timeout: seconds a request may take; also how long a server that went away is waited for.
        cafile: a CA bundle for a server whose certificate no public CA signed (default:
            ``$MEDSAM_SLICER_CA``, else the system's).
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 60.0,
                 cafile: Optional[str] = None) -> None:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MedSAMError(f"the server URL must look like https://host:port or http://127.0.0.1:port; got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.scheme, self.host = parts.scheme, parts.hostname
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise MedSAMError(f"the server URL has a bad port: {url!r}") from None
        self.prefix = parts.path.rstrip("/")
        self.token = token or None
        self.timeout = float(timeout)
        cafile = cafile or os.environ.get(CA_ENV) or None
        self._context = ssl.create_default_context(cafile=cafile) if self.scheme == "https" else None
        self._conn: Optional[http.client.HTTPConnection] = None
        self._lock = threading.Lock()

    def insecure_note(self) -> Optional[str]:
        """A warning when a token would travel unencrypted to another machine."""
        if self.scheme == "http" and self.token and not _is_loopback(self.host):
            return (f"{self.url} is plain HTTP: the token and the images travel unencrypted; use https:// "
                    "(docs/remote.md, 'TLS')")
        return None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._context)
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def request(self, method: str, path: str, body: Optional[bytes] = None, data: Any = None,
                headers: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None,
                patient: bool = False, wait_rate: bool = True) -> Tuple[int, Dict[str, Any]]:
        """One request; the JSON answer (``{}`` when empty). ``patient``: a server that is not
        there (refused, dropped) is tried again for up to ``timeout`` (it may be restarting);
        ``wait_rate``: a 429 is waited out (``Retry-After``) within ``timeout``.

        Raises:
            Unreachable: no answer (refused, dropped, timed out, name unknown).
            RemoteError: an error answer (4xx/5xx), in the server's words. A 429 is waited out
                (``Retry-After``) within ``timeout``.
            MedSAMError: the certificate is not trusted.
        """
        timeout = self.timeout if timeout is None else timeout
        all_headers = protocol.client_headers(self.token)
        if data is not None:
            body = json.dumps(data, separators=(",", ":")).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        give_up = time.monotonic() + timeout
        while True:
            try:
                status, answer, retry = self._once(method, self.prefix + path, body, all_headers, timeout)
            except Unreachable as exc:
                if not (patient and exc.lost and time.monotonic() + 0.5 < give_up):
                    raise
                time.sleep(0.5)
                continue
            if status == 429 and wait_rate and retry is not None and time.monotonic() + retry < give_up:
                time.sleep(retry)
                continue
            if status >= 400:
                message = answer.get("error") or f"HTTP {status}"
                raise RemoteError(f"the server at {self.url}: {message}", status, str(answer.get("code", "")))
            return status, answer

    def _once(self, method, path, body, headers, timeout) -> Tuple[int, Dict[str, Any], Optional[float]]:
        with self._lock:
            for attempt in (0, 1):
                conn = self._connection(timeout)
                try:
                    conn.request(method, path, body=body, headers=headers)
                    response = conn.getresponse()
                    raw = response.read()
                    if response.getheader("Connection", "").lower() == "close":
                        self._drop()
                    break
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                    self._drop()
                    if attempt == 0:  # a kept-alive connection the server had closed: once more, afresh
                        continue
                    raise Unreachable(f"the connection to {self.url} was dropped before it answered ({exc}); "
                                      "check the network, or whether the server restarted", lost=True) from None
                except ssl.SSLCertVerificationError as exc:
                    self._drop()
                    raise MedSAMError(f"the certificate of {self.url} is not trusted ({exc.verify_message}); if "
                                      f"the server uses its own certificate, give its CA file with {CA_ENV} or "
                                      "--server-ca") from None
                except ssl.SSLError as exc:
                    self._drop()
                    raise Unreachable(f"TLS with {self.url} failed ({exc.reason or exc}): is it an https:// "
                                      "server?") from None
                except (socket.timeout, TimeoutError):
                    self._drop()
                    raise Unreachable(f"the server at {self.url} did not answer within {timeout:g} s") from None
                except ConnectionRefusedError:
                    self._drop()
                    raise Unreachable(f"nobody answers at {self.url} (connection refused): is the server "
                                      "running, and the port right?", lost=True) from None
                except socket.gaierror:
                    self._drop()
                    raise Unreachable(f"the server's name '{self.host}' is unknown (check the URL)") from None
                except (OSError, http.client.HTTPException) as exc:
                    self._drop()
                    raise Unreachable(f"the connection to {self.url} failed ({type(exc).__name__}: {exc})") from None
        text = raw.decode("utf-8", "replace")
        try:
            answer = json.loads(text) if text.strip() else {}
        except ValueError:
            answer = {"error": f"HTTP {response.status} with an answer that is not ours ({text[:80]!r}): is "
                               "this a medsam-slicer server, or a proxy in front of one that failed?"}
        if not isinstance(answer, dict):
            answer = {"error": f"HTTP {response.status}: an answer that is not ours"}
        retry = response.getheader("Retry-After")
        return response.status, answer, (float(retry) if retry and retry.isdigit() else None)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def health(self) -> Dict[str, Any]:
        """``GET /health``, checked for the protocol version (both ways: the server checks ours)."""
        try:
            _, answer = self.request("GET", "/health")
        except RemoteError as exc:
            if exc.code == "version":
                raise MedSAMError(str(exc)) from None
            raise
        if "api" not in answer or "version" not in answer:
            raise MedSAMError(f"{self.url} does not answer like a medsam-slicer server (no version in /health)")
        problem = protocol.compatibility(protocol.API_VERSION, VERSION, int(answer["api"]), str(answer["version"]))
        if problem:
            raise MedSAMError(f"{self.url}: {problem}")
        return answer

    def info(self) -> Dict[str, Any]:
        """``GET /info``: the engine (needs the token: a good way to test it)."""
        return self.request("GET", "/info")[1]


def check_connection(url: str, token: Optional[str], timeout: float = 10.0, cafile: Optional[str] = None) -> str:
    """One line for a "Test connection" button: what the server runs, or why it cannot be used.

    Raises:
        MedSAMError: the reason, in words.
    """
    client = RemoteClient(url, token, timeout, cafile)
    try:
        health = client.health()
        engine = client.info()
    finally:
        client.close()
    note = client.insecure_note()
    return (f"connected: medsam-slicer {health['version']} serving {engine['title']} on {engine['device']} "
            f"(speed {engine['speed']}, {engine['precision']})" + (f"; warning: {note}" if note else ""))


class _Spec:
    """The server's model as a record names it (``Segmenter.spec``'s fields that front ends read)."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self.name, self.title, self.input_size = str(info["model"]), str(info["title"]), int(info["input_size"])


class RemoteSegmenter:
    """A :class:`~MedSAMSlicerLib.segmenter.Segmenter` whose model runs on a ``medsam-slicer serve``.

    Args:
        url, token, timeout, cafile: see :class:`RemoteClient`.
        model: the model the caller expects (``None``: the server's); another one is refused.
        speed: likewise for the speed setting.

    Raises:
        MedSAMError: the server cannot be reached or used (see :class:`RemoteClient`), or runs
            another model or speed.
    """

    #: A local segmenter's predictor; the server holds the embeddings here.
    predictor = None

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 60.0, cafile: Optional[str] = None,
                 model: Optional[str] = None, speed: Optional[str] = None) -> None:
        from ..models.speed import get_speed

        self.client = RemoteClient(url, token, timeout, cafile)
        self.health = self.client.health()
        self.engine = self.client.info()
        for what, wanted, served in (("model", model, self.engine["model"]), ("speed", speed, self.engine["speed"])):
            if wanted is not None and wanted != served:
                raise MedSAMError(f"the server at {self.client.url} runs the {what} '{served}', not '{wanted}': "
                                  f"ask with --{what} {served}, or use a server that runs '{wanted}'")
        self.spec = _Spec(self.engine)
        self.speed = get_speed(self.engine["speed"])
        self.device = f"{self.engine['device']} at {self.client.url}"
        self.weights = f"the weights of the server at {self.client.url}"
        self.window = None
        #: A local segmenter's fallback notes; the server's are its operator's (its log).
        self.notes: list = []
        self._array: Optional[np.ndarray] = None
        self._sha: Optional[str] = None
        self._session: Optional[str] = None
        #: Sessions opened (1 + how often the server had lost one): for messages and tests.
        self.sessions_opened = 0
        #: Seconds the server's engine spent on the last job (its wall time minus this is the network's share).
        self.last_run_s = float("nan")

    @property
    def weights_sha256(self) -> str:
        return str(self.engine["weights_sha256"])

    @property
    def precision(self) -> str:
        return str(self.engine["precision"])

    def describe(self) -> str:
        """One line: the server's model, device and precision."""
        return f"{self.engine['describe']} (on the server {self.client.url})"

    # -- volume ----------------------------------------------------------------------------------
    def set_volume(self, array_zyx: np.ndarray, window=None, key: Optional[str] = None) -> None:
        """Work on a volume: uploaded once (a session on the server) unless it is the one it has.

        Args:
            array_zyx: raw intensities ``(z, y, x)`` (as :meth:`Segmenter.set_volume`).
            window: as :meth:`Segmenter.set_volume` (resolved here, so the record says which).
            key: unused (the server names the volume by its SHA-256).
        """
        from ..segmentation.preprocessing import resolve_window

        arr = np.asarray(array_zyx)
        if arr.ndim != 3:
            raise MedSAMError(f"the volume must be 3D (z, y, x); got an array of shape {arr.shape}")
        self.window = resolve_window(window, arr)
        if arr is not self._array:
            sha = volume_sha256(arr)
            if sha != self._sha:
                self.close()
                self._sha = sha
            self._array = arr
        if self._session is None:
            self._open()

    @property
    def shape(self) -> Tuple[int, int, int]:
        if self._array is None:
            raise MedSAMError("no volume set: call set_volume() first")
        return tuple(self._array.shape)  # type: ignore[return-value]

    def _open(self) -> str:
        if self._array is None:
            raise MedSAMError("no volume set: call set_volume() first")
        body = protocol.pack_volume(self._array)
        _, answer = self.client.request("POST", "/sessions", body=body, patient=True,
                                        headers={protocol.SHA_HEADER: self._sha or volume_sha256(self._array),
                                                 "Content-Type": "application/octet-stream"})
        self._session = str(answer["session"])
        self.engine = dict(answer.get("engine", self.engine))
        self.sessions_opened += 1
        return self._session

    def close(self) -> None:
        """Close the session on the server (best effort: it expires by itself anyway)."""
        sid, self._session = self._session, None
        if sid is not None:
            try:
                self.client.request("DELETE", f"/sessions/{sid}", timeout=min(self.client.timeout, 5.0))
            except MedSAMError:
                pass

    # -- jobs ------------------------------------------------------------------------------------
    def _run(self, payload: Dict[str, Any], progress: Optional[ProgressCallback], cancel: Optional[CancelToken]):
        if self.window is None:
            raise MedSAMError("no volume set: call set_volume() first")
        payload = {**payload, "window": protocol.window_json(self.window)}
        for attempt in (0, 1):
            if cancel is not None:
                cancel.raise_if_cancelled()
            try:
                sid = self._session or self._open()
                _, answer = self.client.request("POST", f"/sessions/{sid}/jobs", data=payload, patient=True)
                job = str(answer["job"])
                try:
                    return protocol.result_from_json(self._follow(job, progress, cancel))
                except KeyboardInterrupt:
                    self._cancel(job)  # Ctrl+C: the server stops too
                    raise
            except RemoteError as exc:
                if exc.code not in _GONE or attempt == 1:
                    raise
                self._session = None  # expired, or the server restarted: upload again, run again
        raise AssertionError("unreachable")

    def _follow(self, job: str, progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> Dict[str, Any]:
        """Wait for ``job``, reporting its progress; its result. A server that stops answering is
        waited for up to the client's timeout (it may be restarting)."""
        seen, lost_since = -1, None
        while True:
            if cancel is not None and cancel.cancelled:
                self._cancel(job)
                raise Cancelled("cancelled by the user")
            try:
                _, status = self.client.request("GET", f"/jobs/{job}?wait={POLL_WAIT_S}&seen={seen}",
                                                timeout=self.client.timeout + POLL_WAIT_S)
                lost_since = None
            except Unreachable as exc:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > self.client.timeout:
                    raise Unreachable(f"{exc}; the server stopped answering during the run (waited "
                                      f"{self.client.timeout:g} s)") from None
                time.sleep(0.5)
                continue
            if int(status.get("version", -1)) == seen and status.get("state") in ("queued", "running"):
                continue  # nothing new (the long poll timed out)
            seen = int(status.get("version", -1))
            state = status.get("state")
            if progress is not None:
                if state == "queued":
                    ahead = int(status.get("position", 0))
                    progress(0, 1, f"waiting for the server ({ahead} job(s) ahead)" if ahead else "queued")
                elif int(status.get("total", 0)) > 0:
                    progress(int(status["done"]), int(status["total"]), str(status.get("message", "")))
            if state == "done":
                self.last_run_s = float(status.get("run_s", float("nan")))
                return status["result"]
            if state == "failed":
                raise RemoteError(str(status.get("error", "the job failed")), 400, "failed")
            if state == "cancelled":
                raise Cancelled("cancelled")

    def _cancel(self, job: str) -> None:
        """Ask the server to stop ``job`` (best effort: the client stops waiting anyway)."""
        try:
            self.client.request("DELETE", f"/jobs/{job}", timeout=5.0)
        except MedSAMError:
            pass

    def segment(self, prompt: BoxPrompt, mode: str = "3d", direction: str = "both",
                progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                settings=None) -> Segmentation:
        """:meth:`Segmenter.segment <MedSAMSlicerLib.segmenter.Segmenter.segment>` on the server."""
        _local_settings_only(settings)
        return self._run({"kind": "segment", "prompt": protocol.prompt_json(prompt), "mode": mode,
                          "direction": direction}, progress, cancel)

    def segment_structures(self, prompts: Mapping[str, BoxPrompt], progress: Optional[ProgressCallback] = None,
                           cancel: Optional[CancelToken] = None, settings=None) -> StructuresResult:
        """:meth:`Segmenter.segment_structures <MedSAMSlicerLib.segmenter.Segmenter.segment_structures>`
        on the server."""
        _local_settings_only(settings)
        if not prompts:
            raise MedSAMError("give at least one structure to segment")
        job = self._run({"kind": "structures", "prompts": {str(n): protocol.prompt_json(p)
                                                           for n, p in prompts.items()}}, progress, cancel)
        job.results = {n: job.results[str(n)] for n in prompts}
        return job

    def correct(self, current, corrections: Sequence[Correction], locked: Optional[Sequence[int]] = None,
                z_range: Optional[Tuple[int, int]] = None, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None, settings=None) -> PropagationResult:
        """:meth:`Segmenter.correct <MedSAMSlicerLib.segmenter.Segmenter.correct>` on the server."""
        _local_settings_only(settings)
        sent = (protocol.propagation_json(current) if isinstance(current, PropagationResult)
                else protocol.pack_mask(np.asarray(current, dtype=bool)))
        return self._run({"kind": "correct", "current": sent,
                          "corrections": [protocol.correction_json(c) for c in corrections],
                          "locked": None if locked is None else [int(z) for z in locked],
                          "z_range": None if z_range is None else [int(v) for v in z_range]}, progress, cancel)


def _local_settings_only(settings) -> None:
    if settings is not None:
        raise MedSAMError("propagation settings are the server's own; a remote run uses its defaults")
