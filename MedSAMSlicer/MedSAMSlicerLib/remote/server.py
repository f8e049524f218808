"""``medsam-slicer serve``: the engine behind HTTP (FastAPI on uvicorn), for clients without a GPU.

Routes (JSON answers; errors are ``{"error": message, "code": ...}``):

* ``GET /health``: no token needed: status, version, protocol, model, device.
* ``GET /info`` (the engine: model, weights' SHA-256, speed, precision), ``GET /stats`` (sessions,
  memory held, jobs run).
* ``POST /sessions``: body = :func:`~MedSAMSlicerLib.remote.protocol.pack_volume` bytes, header
  ``X-MedSAM-Volume-SHA256``; checks size, format, hash and voxels; answers the session id and the
  engine (model, weights' SHA-256, speed, precision).
* ``GET /sessions/{id}``: the session's volume shape and embeddings (held, its cap, computed,
  evicted); ``DELETE /sessions/{id}``.
* ``POST /sessions/{id}/jobs``: ``{"kind": "segment"|"structures"|"correct", "window": ..., ...}``
  queues an engine call; answers the job id.
* ``GET /jobs/{id}?wait=S``: waits up to ``S`` seconds (at most 10) for the job to move on; answers
  its state, progress and, when done, its result. ``DELETE /jobs/{id}`` cancels it.

Everything but ``/health`` needs ``Authorization: Bearer <token>`` when the server has tokens; a
session and its jobs answer only the token that made them (to any other: "no such session").
A request naming another protocol gets HTTP 426 with what to update
(:func:`~MedSAMSlicerLib.remote.protocol.compatibility`).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations, and the names
# they use are imported inside create_app (FastAPI loads only when serving).

import asyncio
import ipaddress
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import MedSAMError
from ..segmentation.provenance import VERSION, volume_sha256
from . import protocol
from .sessions import LimitReached, Limits, Missing, Service, check_token, log, owner_of

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_tokens(token_file: Optional[str], environ: Dict[str, str]) -> List[str]:
    """The tokens the server accepts: one per line of ``token_file`` (blank lines and ``#`` comments
    skipped; several lines: several users, each with their own sessions), else the
    ``MEDSAM_SLICER_TOKEN`` environment variable; none: an empty list.

    Raises:
        MedSAMError: the file cannot be read, or a token shorter than 16 characters.
    """
    if token_file:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise MedSAMError(f"cannot read the token file '{token_file}': {exc.strerror or exc}") from None
        tokens = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
        if not tokens:
            raise MedSAMError(f"the token file '{token_file}' holds no token (one per line)")
    else:
        value = environ.get(protocol.TOKEN_ENV, "").strip()
        tokens = [value] if value else []
    for n, token in enumerate(tokens, 1):
        if len(token) < 16:
            raise MedSAMError(f"token {n} is {len(token)} characters long; use at least 16 random characters "
                              "(e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\")")
    return tokens


@dataclass
class ServeOptions:
    """``medsam-slicer serve``'s settings."""

    host: str = "127.0.0.1"
    port: int = 8765
    tokens: List[str] = field(default_factory=list)
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    model: str = "litemedsam"
    checkpoint: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"
    speed: str = "exact"
    download: bool = False
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        """Refuse what must not run, before anything loads.

        Raises:
            MedSAMError: no token on an address other than loopback; half a TLS pair; a port out of range.
        """
        if not self.tokens and not is_loopback(self.host):
            raise MedSAMError(f"refusing to listen on {self.host} without a token: anyone who reaches it could use "
                              f"the server. Set {protocol.TOKEN_ENV} or give --token-file (without a token the "
                              "server listens on 127.0.0.1 only)")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise MedSAMError("give both --ssl-certfile and --ssl-keyfile (or neither, e.g. behind a TLS proxy)")
        for path in (self.ssl_certfile, self.ssl_keyfile):
            if path and not Path(path).is_file():
                raise MedSAMError(f"the TLS file '{path}' does not exist")
        if not 0 < self.port < 65536:
            raise MedSAMError(f"--port must be 1..65535; got {self.port}")
        for flag, value in (("--cache-mb", self.limits.cache_mb), ("--session-cache-mb", self.limits.session_cache_mb)):
            if value < 0:
                raise MedSAMError(f"{flag} must be 0 or more (MiB); got {value}")


def engine_info(segmenter) -> Dict[str, Any]:
    """What a client needs to know of the server's engine (and writes into its records)."""
    return {"model": segmenter.spec.name, "title": segmenter.spec.title, "speed": segmenter.speed.name,
            "precision": segmenter.precision, "weights_sha256": segmenter.weights_sha256,
            "device": str(segmenter.device), "describe": segmenter.describe().split("; weights ")[0], "input_size": segmenter.spec.input_size}


def create_app(service: Service, tokens: List[str]):
    """The FastAPI application over ``service``."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool

    segmenter = service.segmenter
    info = engine_info(segmenter)
    limits = service.limits
    app = FastAPI(title="medsam-slicer", version=VERSION, docs_url=None, redoc_url=None, openapi_url=None)

    class Refused(Exception):
        def __init__(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None):
            super().__init__(message)
            self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused):
        return JSONResponse({"error": exc.message, "code": exc.code}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"bad request: {where}: {first.get('msg', 'invalid')}", "code": "bad_request"},
                            status_code=422)

    @app.middleware("http")
    async def _protocol(request: Request, call_next):
        asked = request.headers.get(protocol.API_HEADER)
        if asked is not None:
            try:
                problem = protocol.compatibility(int(asked), request.headers.get(protocol.VERSION_HEADER, "?"),
                                                 protocol.API_VERSION, VERSION)
            except ValueError:
                problem = f"the {protocol.API_HEADER} header must be a number; got {asked!r}"
            if problem:
                return JSONResponse({"error": problem, "code": "version", "version": VERSION,
                                     "api": protocol.API_VERSION}, status_code=426)
        return await call_next(request)

    def owner(request: Request) -> str:
        if tokens:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            who = check_token(given.strip(), tokens) if scheme.lower() == "bearer" else None
            if who is None:
                raise Refused(401, "token", "the server refused the token (missing or wrong): set "
                                            f"{protocol.TOKEN_ENV} to the token its operator gave you",
                              {"WWW-Authenticate": "Bearer"})
        else:
            who = owner_of(None)
        wait = service.limiter.take(who)
        if wait > 0:
            raise Refused(429, "rate", f"too many requests (at most {limits.rate_limit:g} a second); slow down",
                          {"Retry-After": f"{max(1, round(wait))}"})
        return who

    def found(call, *args):
        try:
            return call(*args)
        except Missing as exc:
            raise Refused(404, exc.code, str(exc)) from None
        except LimitReached as exc:
            raise Refused(exc.status, "limit", str(exc)) from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "version": VERSION, "api": protocol.API_VERSION, "model": info["model"],
                "device": info["device"], "speed": info["speed"], "sessions": len(service.sessions),
                "auth": bool(tokens)}

    @app.get("/info")
    async def engine(who: str = Depends(owner)):
        return info

    @app.get("/stats")
    async def stats(who: str = Depends(owner)):
        return service.stats()

    @app.post("/sessions", status_code=201)
    async def open_session(request: Request, who: str = Depends(owner)):
        cap = limits.max_upload_mb << 20
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise Refused(413, "too_large", f"the upload is {int(length) / 2**20:.1f} MiB; this server accepts "
                                            f"at most {limits.max_upload_mb} MiB compressed")
        expected = request.headers.get(protocol.SHA_HEADER, "").strip().lower()
        if len(expected) != 64:
            raise Refused(400, "bad_request", f"the upload needs the {protocol.SHA_HEADER} header (its SHA-256)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise Refused(413, "too_large", f"the upload is larger than this server accepts "
                                                f"({limits.max_upload_mb} MiB compressed)")
            chunks.append(chunk)
        body = b"".join(chunks)

        def check():
            from ..fileio.orientation import AxialOrientation
            from ..fileio.volumes import check_array_values

            array = protocol.unpack_volume(body, limits.max_volume_mb << 20)
            if volume_sha256(array) != expected:
                raise MedSAMError("the volume's voxels do not match the SHA-256 sent with them (damaged in "
                                  "transit?); send it again")
            # In the array's own (z, y, x) indices: the client checked its file in the user's first.
            identity = AxialOrientation.from_lps_direction((1, 0, 0, 0, 1, 0, 0, 0, 1), array.shape[::-1])
            check_array_values(array, identity, "The uploaded volume")
            return array

        try:
            array = await run_in_threadpool(check)
        except MedSAMError as exc:
            raise Refused(400, "bad_volume", str(exc)) from None
        session = found(service.open_session, who, array, expected)
        return {"session": session.id, "shape": list(array.shape), "session_ttl": limits.session_ttl,
                "engine": info}

    @app.get("/sessions/{sid}")
    async def session_usage(sid: str, who: str = Depends(owner)):
        return found(service.session_usage, sid, who)

    @app.delete("/sessions/{sid}", status_code=204)
    async def close_session(sid: str, who: str = Depends(owner)):
        found(service.close_session, sid, who)
        return Response(status_code=204)

    class WindowIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        level: Optional[float] = None
        width: Optional[float] = None
        percentiles: Optional[List[float]] = None

    class PromptIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        z: int
        box: List[int]
        z_range: Optional[List[int]] = None

    class CorrectionIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        z: int
        box: Optional[List[float]] = None
        more: Optional[List[List[float]]] = Field(default=None, max_length=64)  # boxes of further pieces

    class JobIn(BaseModel):
        # extra="forbid": a request can only say what the protocol says; there is no field for a path.
        model_config = ConfigDict(extra="forbid")
        kind: str
        window: WindowIn
        prompt: Optional[PromptIn] = None
        mode: str = "3d"
        direction: str = "both"
        prompts: Optional[Dict[str, PromptIn]] = None
        current: Optional[Dict[str, Any]] = None
        corrections: Optional[List[CorrectionIn]] = None
        locked: Optional[List[int]] = None
        z_range: Optional[List[int]] = None

    def job_function(body: JobIn):
        """The engine call a request stands for (checked before it queues)."""
        try:
            window = protocol.window_from_json(body.window.model_dump(exclude_none=True))
            if body.kind == "segment" and body.prompt is not None:
                prompt = protocol.prompt_from_json(body.prompt.model_dump())
                mode, direction = body.mode, body.direction
                return lambda load, progress, cancel: protocol.result_json(
                    load(window).segment(prompt, mode, direction, progress, cancel))
            if body.kind == "structures" and body.prompts:
                prompts = {n: protocol.prompt_from_json(p.model_dump()) for n, p in body.prompts.items()}
                return lambda load, progress, cancel: protocol.result_json(
                    load(window).segment_structures(prompts, progress, cancel))
            if body.kind == "correct" and body.current is not None and body.corrections:
                current = (protocol.propagation_from_json(body.current) if "slices" in body.current
                           else protocol.unpack_mask(body.current))
                corrections = [protocol.correction_from_json(c.model_dump()) for c in body.corrections]
                locked = body.locked
                z_range = None if body.z_range is None else (int(body.z_range[0]), int(body.z_range[1]))
                return lambda load, progress, cancel: protocol.result_json(
                    load(window).correct(current, corrections, locked=locked, z_range=z_range, progress=progress,
                                         cancel=cancel))
        except (MedSAMError, KeyError, TypeError, ValueError) as exc:
            raise Refused(400, "bad_request", f"bad request: {exc}") from None
        raise Refused(400, "bad_request", "a job is {'kind': 'segment', 'prompt': ...}, {'kind': 'structures', "
                                          "'prompts': ...} or {'kind': 'correct', 'current': ..., 'corrections': ...}")

    @app.post("/sessions/{sid}/jobs", status_code=202)
    async def submit(sid: str, body: JobIn, who: str = Depends(owner)):
        session = found(service.session, sid, who)
        run = await run_in_threadpool(job_function, body)
        job = found(service.submit, session, body.kind, run)
        return {"job": job.id}

    @app.get("/jobs/{jid}")
    async def poll(jid: str, wait: float = 0.0, seen: int = -1, who: str = Depends(owner)):
        job = found(service.job, jid, who)
        deadline = time.monotonic() + min(max(wait, 0.0), 10.0)
        # Long poll: answer when the job moved on since the version the client saw, or at the deadline.
        start = job.version if seen < 0 else seen
        while not job.finished and job.version == start and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        answer = job.status(service.queue.position(job))
        answer["version"] = job.version
        return answer

    @app.delete("/jobs/{jid}", status_code=204)
    async def cancel(jid: str, who: str = Depends(owner)):
        found(service.job, jid, who).cancel.cancel()
        return Response(status_code=204)

    return app


def serve(options: ServeOptions) -> None:
    """Load the model, then answer requests until interrupted (Ctrl+C)."""
    options.check()
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise MedSAMError("the server needs FastAPI and uvicorn: pip install 'medsam-slicer[server]'") from None
    from ..segmenter import Segmenter

    segmenter = Segmenter(options.model, checkpoint=options.checkpoint, device=options.device,
                          precision=options.precision, download=options.download, cache_mb=options.limits.cache_mb,
                          speed=options.speed)
    service = Service(segmenter, options.limits)
    app = create_app(service, options.tokens)
    scheme = "https" if options.ssl_certfile else "http"
    guard = (f"{len(options.tokens)} token(s)" if options.tokens else "no token: loopback only")
    log(f"medsam-slicer serve: {segmenter.describe()}")
    log(f"medsam-slicer serve: {scheme}://{options.host}:{options.port} ({guard}; at most "
        f"{options.limits.max_sessions} sessions, idle ones expire after {options.limits.session_ttl:g} s; "
        f"slice embeddings: {options.limits.session_cache_mb} MiB a session, {options.limits.cache_mb} MiB in all)")
    try:
        uvicorn.run(app, host=options.host, port=options.port, ssl_certfile=options.ssl_certfile,
                    ssl_keyfile=options.ssl_keyfile, log_level="warning", access_log=False, workers=1,
                    timeout_graceful_shutdown=2)
    finally:
        service.stop()


def launch(port: int, args: List[str], env: Optional[Dict[str, str]] = None, cafile: Optional[str] = None,
           timeout: float = 180.0, log: Optional[str] = None):
    """Start ``medsam-slicer serve --host 127.0.0.1 --port PORT ARGS`` in a subprocess (this Python)
    and wait until ``/health`` answers (benchmarks, tests). Returns ``(process, url)``.

    Args:
        log: a file for the server's output (default: a pipe, read when it fails to start).

    Raises:
        MedSAMError: the server exited (its output in the message) or did not answer in time.
    """
    import subprocess

    from .client import RemoteClient

    scheme = "https" if "--ssl-certfile" in args else "http"
    output = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115  (the child holds it)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "MedSAMSlicerLib.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), *map(str, args)], env=env, stdout=output,
                                stderr=subprocess.STDOUT, text=True)
    finally:
        if log:
            output.close()
    url = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = proc.stdout.read().strip() if proc.stdout else f"exit code {proc.returncode}; its log: {log}"
            raise MedSAMError(f"the server exited: {said}")
        try:
            RemoteClient(url, timeout=2, cafile=cafile).health()
            return proc, url
        except MedSAMError:
            time.sleep(0.3)
    proc.kill()
    raise MedSAMError(f"the server did not answer within {timeout:g} s")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
