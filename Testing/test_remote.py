"""``medsam-slicer serve`` and its clients, against real servers started on 127.0.0.1 in
subprocesses (real LiteMedSAM weights, CPU), real sockets, real files: no mocks.

One server is shared by the module (three tokens: three users); a second one, on TLS with a
certificate made here, is killed and restarted under a running client. Boxes are the liver and
spleen of the shipped CT on 3 slices each, so the runs stay short.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from MedSAMSlicerLib.boxes import BoxPrompt
from MedSAMSlicerLib.demo import reference_box
from MedSAMSlicerLib.errors import MedSAMError
from MedSAMSlicerLib.fileio.segnrrd import read_seg_nrrd
from MedSAMSlicerLib.fileio.volumes import read_volume
from MedSAMSlicerLib.remote import protocol
from MedSAMSlicerLib.remote.client import RemoteClient, RemoteError, RemoteSegmenter, check_connection
from MedSAMSlicerLib.remote.server import free_port, launch
from MedSAMSlicerLib.remote.sessions import FairQueue, Job, Session
from MedSAMSlicerLib.segment_command import NamedBox, segment_file
from MedSAMSlicerLib.segmentation.provenance import VERSION, volume_sha256

pytest_plugins = ["conftest_slicer"]

TOKENS = ("alice-token-0123456789abcdef", "bob-token-0123456789abcdef", "carol-token-0123456789abcdef")
LIVER, SPLEEN = 5, 1


def _env(token=None):
    env = dict(os.environ)
    env.pop(protocol.TOKEN_ENV, None)
    env.pop("MEDSAM_SLICER_CA", None)
    if token:
        env[protocol.TOKEN_ENV] = token
    return env


def _cli(*args, token=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "MedSAMSlicerLib.cli", *map(str, args)], capture_output=True,
                          text=True, env=_env(token), timeout=timeout)


def _start(port, *extra, cafile=None, env=None):
    """A server on 127.0.0.1:port (CPU); returns (process, url) once /health answers."""
    return launch(port, ["--device", "cpu", *map(str, extra)], env=env or _env(), cafile=cafile)


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The module's server: three users' tokens, small limits (6 sessions, 3 MiB uploads, 20 requests/s)."""
    folder = tmp_path_factory.mktemp("server")
    (folder / "tokens").write_text("# one token per user\n" + "\n".join(TOKENS) + "\n")
    proc, url = _start(free_port(), "--token-file", folder / "tokens", "--max-sessions", 6, "--max-upload-mb", 3,
                       "--rate-limit", 20)
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def boxes(ct, ct_seg_path):
    """Liver and spleen: 3D boxes (file indices) over 3 slices around each label's largest slice."""
    labels = read_volume(ct_seg_path).array
    out = []
    for name, value in (("liver", LIVER), ("spleen", SPLEEN)):
        z, (x0, y0, x1, y1) = reference_box(labels == value)
        a = ct.orientation.canonical_to_ijk((x0, y0, z - 1))
        b = ct.orientation.canonical_to_ijk((x1, y1, z + 1))
        out.append(NamedBox(name, "ijk", (*a, *b), None, f"box {len(out) + 1} ('{name}', --box-ijk)"))
    return out


@pytest.fixture(scope="module")
def local_run(lite_segmenter, ct_path, boxes, tmp_path_factory):
    """The same two structures run locally (the reference a remote run must equal)."""
    out = tmp_path_factory.mktemp("local") / "organs.seg.nrrd"
    segment_file(str(ct_path), out, prompts=boxes, segmenter=lite_segmenter, progress=False)
    return out


def _box_args(boxes):
    return [a for b in boxes for a in ("--box-ijk", *(str(int(v)) for v in b.values), "--name", b.name)]


def _masks(path):
    seg = read_seg_nrrd(path)
    return {s.name: (seg.mask_kji(s), s.tags) for s in seg.segments}


def _error_line(done):
    """The one line a failed command prints (no traceback)."""
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and lines[-1].startswith("medsam-slicer: error: "), done.stderr
    return lines[-1]


# -- server basics ---------------------------------------------------------------------------------
def test_health_is_open_everything_else_needs_a_token_and_the_protocol(server):
    """/health answers anyone (version, protocol, model, device); /info wants a token from the
    list; another protocol version gets HTTP 426 saying which side to update."""
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        health = json.load(r)
    assert health["status"] == "ok" and health["version"] == VERSION and health["api"] == protocol.API_VERSION
    assert health["model"] == "litemedsam" and health["device"] == "cpu" and health["auth"] is True
    with pytest.raises(RemoteError, match="refused the token") as no_token:
        RemoteClient(server).info()
    assert no_token.value.status == 401
    with pytest.raises(RemoteError, match="refused the token"):
        RemoteClient(server, "x" * 30).info()
    assert RemoteClient(server, TOKENS[1]).info()["weights_sha256"] == RemoteClient(server, TOKENS[0]).info()[
        "weights_sha256"]
    assert "connected: medsam-slicer" in check_connection(server, TOKENS[0])

    newer = urllib.request.Request(server + "/info", headers={"Authorization": f"Bearer {TOKENS[0]}",
                                                              protocol.API_HEADER: "999"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(newer, timeout=10)
    assert refused.value.code == 426
    assert "ask whoever runs the server to update it" in json.load(refused.value)["error"]
    # The rule both sides use: the older side is told to update.
    assert "update medsam-slicer here" in protocol.compatibility(1, "0.1.0", 2, "0.2.0")
    assert "ask whoever runs the server" in protocol.compatibility(2, "0.2.0", 1, "0.1.0")
    assert protocol.compatibility(1, "0.1.0", 1, "0.1.5") is None


def test_serve_refuses_a_public_address_without_a_token():
    done = _cli("serve", "--host", "0.0.0.0", "--port", free_port(), timeout=60)
    assert "refusing to listen on 0.0.0.0 without a token" in _error_line(done)
    done = _cli("serve", "--port", free_port(), token="short", timeout=60)
    assert "at least 16 random characters" in _error_line(done)


# -- the command line as a client ------------------------------------------------------------------
def test_segment_on_the_server_writes_the_same_file_and_record_and_replays(server, ct_path, boxes, local_run,
                                                                          tmp_path):
    """segment --server: the same masks, the same MedSAM.* record (but the date and the job's id)
    and the same review as a local run; --replay of the local file on the server finds the same masks."""
    out = tmp_path / "remote.seg.nrrd"
    done = _cli("segment", ct_path, *_box_args(boxes), "-o", out, "--server", server, token=TOKENS[0])
    assert done.returncode == 0, done.stderr
    remote, local = _masks(out), _masks(local_run)
    assert list(remote) == ["liver", "spleen"]
    for name in remote:
        assert np.array_equal(remote[name][0], local[name][0]) and remote[name][0].any(), name
        differ = {k for k in remote[name][1] if remote[name][1][k] != local[name][1].get(k)}
        assert differ == {"MedSAM.Date", "MedSAM.Job"}, differ
    review = json.loads(out.with_name("remote.review.json").read_text())
    local_review = json.loads(local_run.with_name("organs.review.json").read_text())
    assert [s["slices"] for s in review["structures"]] == [s["slices"] for s in local_review["structures"]]

    again = tmp_path / "again.seg.nrrd"
    done = _cli("segment", ct_path, "--replay", local_run, "-o", again, "--server", server, token=TOKENS[0])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("the same mask as in the file") == 2, done.stdout


def test_sessions_belong_to_their_token_and_come_back_by_themselves(server, ct, boxes, lite_segmenter):
    """Another token cannot see a session; a session the server lost is opened again by the client,
    and the result is the local one."""
    seg = RemoteSegmenter(server, TOKENS[0], timeout=30, model="litemedsam")
    seg.set_volume(ct.array, None)
    sid = seg._session
    prompt = BoxPrompt.from_voxel_box(*_canonical(ct, boxes[0]))
    other = RemoteClient(server, TOKENS[1])
    with pytest.raises(RemoteError, match="no such session") as unknown:
        other.request("POST", f"/sessions/{sid}/jobs", data={"kind": "segment", "window": {"level": 40, "width": 400},
                                                             "prompt": protocol.prompt_json(prompt)})
    assert unknown.value.status == 404
    with pytest.raises(RemoteError, match="no such session"):
        other.request("DELETE", f"/sessions/{sid}")
    seg.client.request("DELETE", f"/sessions/{sid}")  # the server forgets it (as on expiry or a restart)
    remote = seg.segment(BoxPrompt(prompt.z, prompt.box), "2d")
    assert seg.sessions_opened == 2 and seg._session != sid
    lite_segmenter.set_volume(ct.array, seg.window)
    assert np.array_equal(remote.mask, lite_segmenter.segment(BoxPrompt(prompt.z, prompt.box), "2d").mask)
    seg.close()


def test_cancel_stops_the_job_on_the_server(server, ct, boxes):
    """Cancel (the Slicer button, Ctrl+C) stops the client at once and the server's job at its next
    slice; the server is free again."""
    from MedSAMSlicerLib.progress import Cancelled, CancelToken

    seg = RemoteSegmenter(server, TOKENS[1], timeout=30)
    seg.set_volume(ct.array, (55, 333))  # a window no other test uses: nothing cached, the job takes a while
    cancel = CancelToken()
    z, box = _canonical(ct, boxes[0])
    seen = []

    def progress(done, total, message):
        seen.append(message)
        cancel.cancel()

    with pytest.raises(Cancelled):
        seg.segment(BoxPrompt(int(z[2]), (int(z[0]), int(z[1]), int(box[0]), int(box[1]))), "3d", progress=progress,
                    cancel=cancel)
    assert seen
    deadline = time.monotonic() + 600  # a hang guard, not a timing claim
    while seg.client.request("GET", "/stats")[1]["running"]:
        assert time.monotonic() < deadline, "the job went on after Cancel"
        time.sleep(0.2)
    seg.close()


def _canonical(ct, spec):
    from MedSAMSlicerLib.fileio.volumes import ijk_box_to_canonical

    box = ijk_box_to_canonical(ct, *spec.values)
    return box[:3], box[3:]


def test_bad_uploads_and_requests_get_one_clear_answer(server):
    client = RemoteClient(server, TOKENS[2], timeout=30)
    good = np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8)

    def upload(body, sha):
        return client.request("POST", "/sessions", body=body, headers={protocol.SHA_HEADER: sha})

    with pytest.raises(RemoteError, match="at most 3 MiB") as big:
        upload(os.urandom(4 << 20), "0" * 64)
    assert big.value.status == 413
    with pytest.raises(RemoteError, match="not a zlib-compressed"):
        upload(b"not an array", volume_sha256(good))
    with pytest.raises(RemoteError, match="do not match the SHA-256"):
        upload(protocol.pack_volume(good), volume_sha256(good + 1))
    with pytest.raises(RemoteError, match="ends early"):
        upload(protocol.pack_volume(good)[:-8], volume_sha256(good))
    nan = good.astype(np.float32)
    nan[2, 3, 4] = np.nan
    with pytest.raises(RemoteError, match="NaN"):
        upload(protocol.pack_volume(nan), volume_sha256(nan))
    with pytest.raises(RemoteError, match="blank"):
        upload(protocol.pack_volume(np.zeros((3, 8, 8))), volume_sha256(np.zeros((3, 8, 8))))
    with pytest.raises(RemoteError, match="3D array"):
        upload(protocol.pack_volume(good[0]), volume_sha256(good[0]))

    _, opened = upload(protocol.pack_volume(good), volume_sha256(good))
    sid = opened["session"]
    # No field names a path: a request that tries is refused, naming the field.
    with pytest.raises(RemoteError, match="checkpoint") as extra:
        client.request("POST", f"/sessions/{sid}/jobs", data={"kind": "segment", "window": {"level": 40, "width": 400},
                                                              "checkpoint": "/etc/passwd",
                                                              "prompt": {"z": 1, "box": [1, 1, 5, 5]}})
    assert extra.value.status == 422
    # A box outside the volume: the engine's own message comes back as the job's error.
    seg_job = client.request("POST", f"/sessions/{sid}/jobs", data={
        "kind": "segment", "window": {"level": 40, "width": 400}, "mode": "2d",
        "prompt": {"z": 9, "box": [1, 1, 5, 5]}})[1]["job"]
    deadline = time.monotonic() + 600  # a hang guard
    while (status := client.request("GET", f"/jobs/{seg_job}?wait=1")[1])["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline
    assert status["state"] == "failed" and "slice 9 is out of range" in status["error"]
    client.request("DELETE", f"/sessions/{sid}")


def test_limits_on_sessions_and_request_rate(server):
    client = RemoteClient(server, TOKENS[2], timeout=30)
    tiny = np.arange(2 * 4 * 4, dtype=np.int16).reshape(2, 4, 4)
    opened = []
    with pytest.raises(RemoteError, match="its limit") as full:
        for _ in range(7):
            opened.append(client.request("POST", "/sessions", body=protocol.pack_volume(tiny),
                                         headers={protocol.SHA_HEADER: volume_sha256(tiny)})[1]["session"])
    assert full.value.status == 503 and 1 <= len(opened) <= 6
    for sid in opened:
        client.request("DELETE", f"/sessions/{sid}")
    with pytest.raises(RemoteError, match="too many requests") as rate:
        for _ in range(200):
            client.request("GET", "/info", wait_rate=False)
    assert rate.value.status == 429


def test_client_is_torch_free(server, ct, boxes, lite_segmenter, tmp_path):
    """What Slicer's Remote mode imports (the client, its protocol, the window rule) runs without
    torch, and gives the local mask."""
    z, box = _canonical(ct, boxes[1])
    np.save(tmp_path / "ct.npy", ct.array)
    code = f"""
import sys, numpy as np
sys.modules['torch'] = None  # importing torch now fails
from MedSAMSlicerLib.boxes import BoxPrompt
from MedSAMSlicerLib.remote.client import RemoteSegmenter
seg = RemoteSegmenter({server!r}, {TOKENS[1]!r}, timeout=60)
seg.set_volume(np.load({str(tmp_path / 'ct.npy')!r}), None)
done = seg.segment(BoxPrompt.from_voxel_box({list(map(int, z))}, {list(map(int, box))}), "3d")
np.save({str(tmp_path / 'mask.npy')!r}, done.mask)
seg.close()
print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi', 'uvicorn')))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['torch']", done.stdout  # only the blocker
    lite_segmenter.set_volume(ct.array, None)
    local = lite_segmenter.segment(BoxPrompt.from_voxel_box(z, box), "3d").mask
    assert np.array_equal(np.load(tmp_path / "mask.npy"), local)


# -- embeddings: a cap per session -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server():
    """A server with room for one slice embedding (4 MiB) per session, whose log is a full disk
    (``/dev/full``: every write fails with ENOSPC)."""
    log = "/dev/full" if os.path.exists("/dev/full") else None
    proc, url = launch(free_port(), ["--device", "cpu", "--session-cache-mb", 4], env=_env(), log=log)
    yield url
    _stop(proc)


def test_a_session_over_its_cap_evicts_only_its_own_embeddings(small_server, ct, boxes):
    """Session B keeps its slice; session A runs a 3-slice 3D box with room for one slice: it
    evicts its own two, B's stays (B's next box computes nothing), and A's next run computes
    the evicted ones again and gives the same mask. The server's log is on a full disk all along
    (it starts and serves: a log it cannot write loses the text, never the server)."""
    first, last = _canonical(ct, boxes[0])
    prompt = BoxPrompt.from_voxel_box(first, last)
    b = RemoteSegmenter(small_server, timeout=60)
    b.set_volume(ct.array, (40, 400))
    b_mask = b.segment(BoxPrompt(prompt.z, prompt.box), "2d").mask

    def usage(seg):
        return seg.client.request("GET", f"/sessions/{seg._session}")[1]["embeddings"]

    assert usage(b) == {"entries": 1, "bytes": 4 << 20, "max_bytes": 4 << 20, "stored": 1, "evicted": 0}
    a = RemoteSegmenter(small_server, timeout=120)
    a.set_volume(ct.array, (60, 360))  # another window: other embeddings
    a_first = a.segment(prompt, "3d")
    a_use = usage(a)
    assert a_use["stored"] == 3 and a_use["entries"] == 1 and a_use["evicted"] == 2, a_use
    assert usage(b)["entries"] == 1 and usage(b)["evicted"] == 0  # B's embedding stayed
    assert np.array_equal(b.segment(BoxPrompt(prompt.z, prompt.box), "2d").mask, b_mask)
    assert usage(b)["stored"] == 1  # answered from its kept embedding: nothing computed
    a_again = a.segment(prompt, "3d")
    # Its evicted slices computed again (with room for one slice, a 3-slice pass evicts as it goes,
    # so the kept slice may be evicted before the pass reaches it: 2 or 3 computed).
    assert usage(a)["stored"] - 3 in (2, 3) and usage(b)["evicted"] == 0
    assert np.array_equal(a_again.mask, a_first.mask) and a_first.mask.any()
    stats = a.client.request("GET", "/stats")[1]
    assert stats["embedding_bytes"] == 8 << 20 and stats["session_embedding_cap_bytes"] == 4 << 20
    a.close()
    b.close()


def test_embeddings_belong_to_the_session_that_used_them_last():
    """The rule under the server (no model): a group over its cap loses its own least recently
    used entries; using another group's entry makes it yours; a released group's entries go
    first when the overall cap needs room."""
    import torch

    from MedSAMSlicerLib.segmentation.predictor import EmbeddingCache

    slice_bytes = 4 << 20
    cache = EmbeddingCache(5 * slice_bytes)
    with cache.working_for("b", 2 * slice_bytes):
        cache.put(("b", 0), torch.zeros(1, 256, 64, 64))
    with cache.working_for("a", 2 * slice_bytes):
        for z in range(3):
            cache.put(("a", z), torch.zeros(1, 256, 64, 64))
        assert ("a", 0) not in cache and ("b", 0) in cache
        cache.get(("b", 0))  # a's now, and a is over its cap again: its oldest goes
    assert ("a", 1) not in cache and cache.usage("a")["entries"] == 2 and cache.usage("b")["entries"] == 0
    cache.release("a")
    assert cache.usage(None)["entries"] == 2
    with cache.working_for("c", 5 * slice_bytes):
        for z in range(4):
            cache.put(("c", z), torch.zeros(1, 256, 64, 64))
    assert len(cache) == 5 and cache.usage("c")["entries"] == 4 and cache.usage(None)["entries"] == 1
    assert ("a", 2) not in cache and ("b", 0) in cache  # the least recently used went first


def test_fair_queue_serves_sessions_in_turn():
    a, b = (Session(s, "o", np.zeros((1, 2, 2)), "x") for s in "ab")
    queue = FairQueue()
    for name, session in (("a1", a), ("a2", a), ("a3", a), ("b1", b)):
        queue.put(Job(name, session, "segment", lambda *args: None))
    assert queue.position(queue._queues["b"][0]) == 1
    assert [queue.get().id for _ in range(4)] == ["a1", "b1", "a2", "a3"]


# -- faults ----------------------------------------------------------------------------------------
def _socket_server(behaviour):
    """A TCP listener on a free port that accepts and then ``behaviour(conn)``: what a broken
    network or a hung host does to a client."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []

    def run():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            behaviour(conn)

    threading.Thread(target=run, daemon=True).start()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_command_line_faults_say_one_thing_and_write_nothing(server, ct_path, boxes, tmp_path):
    out = tmp_path / "x.seg.nrrd"
    args = ["segment", ct_path, *_box_args(boxes[:1]), "-o", out, "--timeout", 2]
    assert "refused the token" in _error_line(_cli(*args, "--server", server, token="wrong-" + "x" * 20))
    port = free_port()
    assert "connection refused" in _error_line(_cli(*args, "--server", f"http://127.0.0.1:{port}", token=TOKENS[0]))
    dropped, url = _socket_server(lambda conn: conn.close())
    assert "was dropped" in _error_line(_cli(*args, "--server", url, token=TOKENS[0]))
    dropped.close()
    silent, url = _socket_server(lambda conn: None)
    assert "did not answer within 2 s" in _error_line(_cli(*args, "--server", url, token=TOKENS[0]))
    silent.close()
    assert "--device choose the local model" in _error_line(_cli(*args, "--server", server, "--device", "cpu"))
    assert not out.exists() and not out.with_name("x.review.json").exists()


def _file_size_limit(limit):
    """For ``preexec_fn``: files of the child may grow to ``limit`` bytes; a write beyond fails with
    EFBIG (SIGXFSZ ignored), as a full disk or quota fails a write with ENOSPC/EDQUOT."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="no file size limit on this system")
def test_full_disk_on_the_client_says_one_line_and_keeps_the_users_files(server, ct_path, boxes, local_run,
                                                                         tmp_path):
    """segment --server --overwrite over the user's earlier result, in a process that cannot write
    files beyond 2 KB: one line, exit code 2, the earlier mask and review byte for byte as they
    were, no temporary file left."""
    out = tmp_path / "organs.seg.nrrd"
    shutil.copy(local_run, out)
    shutil.copy(local_run.with_name("organs.review.json"), tmp_path / "organs.review.json")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    done = subprocess.run([sys.executable, "-m", "MedSAMSlicerLib.cli", "segment", str(ct_path), *_box_args(boxes),
                           "-o", str(out), "--overwrite", "--server", server], capture_output=True, text=True,
                          env=_env(TOKENS[0]), timeout=300, preexec_fn=_file_size_limit(2048))
    line = _error_line(done)
    assert f"could not write '{out}' (File too large); check free space" in line, line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_disk_full_between_the_mask_and_its_review_leaves_neither(server, ct_path, boxes, local_run, tmp_path):
    """A real full disk: a tmpfs (in a user namespace, no root needed) with room for the mask
    alone. The mask is written, the review is not (ENOSPC): nothing is published, no temporary
    file is left (before, the mask stayed without its review)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) for a small tmpfs")
    page = os.sysconf("SC_PAGE_SIZE")
    room = -(-local_run.stat().st_size // page) * page  # the mask's pages, nothing more
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    out = mnt / "organs.seg.nrrd"
    command = " ".join(map(shlex.quote, [sys.executable, "-m", "MedSAMSlicerLib.cli", "segment", str(ct_path),
                                         *_box_args(boxes), "-o", str(out), "--server", server]))
    script = (f"mount -t tmpfs -o size={room} tmpfs {shlex.quote(str(mnt))} || exit 99; {command}; "
              f"echo rc=$?; ls -A {shlex.quote(str(mnt))}")
    done = subprocess.run([unshare, "-rm", "sh", "-c", script], capture_output=True, text=True, env=_env(TOKENS[0]),
                          timeout=300)
    assert done.returncode == 0 and "rc=2" in done.stdout, (done.stdout, done.stderr[-2000:])
    assert done.stdout.strip().splitlines()[-1] == "rc=2", done.stdout  # the folder is empty
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and lines[-1].startswith("medsam-slicer: error: "), done.stderr
    assert "organs.review.json' (No space left on device)" in lines[-1], lines[-1]


def _certificate(folder: Path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_server_killed_and_restarted_under_a_running_client(ct_path, boxes, local_run, tmp_path):
    """A server on TLS (its own self-signed certificate): untrusted without its CA, used with it.
    Killed while a client runs, it is waited for; restarted, the client opens its session again and
    finishes with the local result. Killed for good, the client says so and writes nothing. A
    session left idle expires, and the client opens a new one."""
    cert, key = _certificate(tmp_path)
    port = free_port()
    tls = ["--ssl-certfile", cert, "--ssl-keyfile", key, "--session-ttl", 2]
    proc, url = _start(port, *tls, cafile=str(cert))
    try:
        with pytest.raises(MedSAMError, match="not trusted"):
            RemoteClient(url, timeout=5).health()
        env = _env()
        env["MEDSAM_SLICER_CA"] = str(cert)
        out = tmp_path / "restarted.seg.nrrd"
        client = subprocess.Popen([sys.executable, "-m", "MedSAMSlicerLib.cli", "segment", str(ct_path),
                                   *_box_args(boxes), "-o", str(out), "--server", url, "--timeout", "600"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stats = RemoteClient(url, timeout=5, cafile=str(cert))
        deadline = time.monotonic() + 600  # a hang guard: the job starts long before
        while stats.request("GET", "/stats")[1]["running"] == 0:  # the job runs: kill the server under it
            assert time.monotonic() < deadline and client.poll() is None, client.communicate()
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        proc, _ = _start(port, *tls, cafile=str(cert))
        stdout, stderr = client.communicate(timeout=240)
        assert client.returncode == 0, stderr
        remote, local = _masks(out), _masks(local_run)
        assert all(np.array_equal(remote[n][0], local[n][0]) for n in local)

        # Idle expiry (2 s here): the session is gone, the client opens a new one by itself.
        seg = RemoteSegmenter(url, timeout=30, cafile=str(cert))
        seg.set_volume(np.arange(3 * 16 * 16, dtype=np.int16).reshape(3, 16, 16), (100, 200))
        time.sleep(3.5)
        with pytest.raises(RemoteError, match="expired"):
            seg.client.request("POST", f"/sessions/{seg._session}/jobs",
                               data={"kind": "segment", "window": {"level": 100, "width": 200}, "mode": "2d",
                                     "prompt": {"z": 1, "box": [2, 2, 12, 12]}})
        assert seg.segment(BoxPrompt(1, (2, 2, 12, 12)), "2d").mask.shape == (3, 16, 16)
        assert seg.sessions_opened == 2
        seg.close()

        # Killed for good: the client gives up after its timeout, writes nothing.
        gone = tmp_path / "gone.seg.nrrd"
        client = subprocess.Popen([sys.executable, "-m", "MedSAMSlicerLib.cli", "segment", str(ct_path),
                                   *_box_args(boxes[1:]), "-o", str(gone), "--server", url, "--timeout", "3"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600  # a hang guard: the job starts long before
        while stats.request("GET", "/stats")[1]["running"] == 0:
            assert time.monotonic() < deadline and client.poll() is None, client.communicate()
            time.sleep(0.1)
        proc.kill()
        proc.wait()
        _, stderr = client.communicate(timeout=120)
        assert client.returncode == 2 and "stopped answering during the run" in stderr.strip().splitlines()[-1], stderr
        assert not gone.exists()
    finally:
        _stop(proc)


# -- the Slicer side --------------------------------------------------------------------------------
def test_backend_choice_and_where_the_token_is_kept(monkeypatch):
    """The module's Local / Remote setting (Qt-free): the token typed this session first, then the
    remembered one, then $MEDSAM_SLICER_TOKEN; it goes into Slicer's settings only when asked."""
    pytest.importorskip("slicer")
    from MedSAMBridgeLib import backends, compat

    s = {backends.SETTINGS_BACKEND: "remote", backends.SETTINGS_SERVER_URL: " https://gpu:8765 ",
         backends.SETTINGS_SERVER_TOKEN: "remembered"}
    assert backends.Backend.from_settings(s, "typed", {}).token == "typed"
    assert backends.Backend.from_settings(s, "", {}).token == "remembered"
    chosen = backends.Backend.from_settings({**s, backends.SETTINGS_SERVER_TOKEN: ""}, "", {"MEDSAM_SLICER_TOKEN": "env"})
    assert chosen.token == "env" and chosen.url == "https://gpu:8765" and "env" not in repr(chosen)
    assert chosen.settings(remember_token=False)[backends.SETTINGS_SERVER_TOKEN] == ""
    assert chosen.settings(remember_token=True)[backends.SETTINGS_SERVER_TOKEN] == "env"
    assert not backends.Backend.from_settings({}, "", {}).remote
    with pytest.raises(MedSAMError, match="give the server's URL"):
        backends.Backend("remote", "gpu:8765").check()
    assert compat.runtime_requirements(remote=True) == [] and compat.runtime_requirements()
    from MedSAMBridgeLib import installs

    assert installs.plan_installs("litemedsam", remote=True).ready  # Remote: no PyTorch to install


def test_slicer_bridge_in_remote_mode_is_torch_free_and_gives_the_local_result(server, ct_sm_path, tmp_path):
    """The bridge with a Remote backend, on real MRML nodes (slicer-core) in a process where torch
    cannot be imported: a 3D box and a correction give the masks and records of the local bridge."""
    pytest.importorskip("slicer")
    import slicer
    from slicer_helpers import MODULE_DIR, ijk_to_ras, label_box_ijk

    from MedSAMBridgeLib.headless import create_headless_scene, load_volume
    from MedSAMBridgeLib.MRMLBridge import BoxPrompt, MedSAMBridge
    from MedSAMSlicerLib.segmenter import shared_segmenter

    create_headless_scene()
    ct = load_volume(ct_sm_path, "CT")
    labels = load_volume(str(ct_sm_path).replace("example_ct_sm", "example_seg"), "labels", labelmap=True)
    lo, hi = label_box_ijk(slicer.util.arrayFromVolume(labels) == LIVER, (17, 19))
    matrix = ijk_to_ras(ct)
    corners = [list((matrix @ np.r_[c, 1.0])[:3]) for c in (lo, hi)]

    script = f"""
import json, sys
sys.modules['torch'] = None
sys.path.insert(0, {str(MODULE_DIR)!r})
import numpy as np
from MedSAMBridgeLib.backends import Backend
from MedSAMBridgeLib.headless import create_headless_scene, load_volume
from MedSAMBridgeLib.MRMLBridge import BoxPrompt, MedSAMBridge
scene = create_headless_scene()
ct = load_volume({str(ct_sm_path)!r}, "CT")
seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
bridge = MedSAMBridge(backend=Backend("remote", {server!r}, {TOKENS[2]!r}))
sid, first = bridge.segment(ct, seg, box_ras={corners!r}, mode="3d")
z, (x0, y0, x1, y1) = first.prompt.z, first.prompt.box
fixed = bridge.compute(bridge.correction_request(first, BoxPrompt(z - 1, (x0 + 2, y0 + 2, x1 - 2, y1 - 2))))
np.save({str(tmp_path / 'first.npy')!r}, first.mask)
np.save({str(tmp_path / 'fixed.npy')!r}, fixed.mask)
json.dump({{"first": first.record.tags(), "fixed": fixed.record.tags(),
           "torch": [m for m in sys.modules if m.split('.')[0] == 'torch' and sys.modules[m] is not None]}},
          open({str(tmp_path / 'out.json')!r}, "w"))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = json.loads((tmp_path / "out.json").read_text())
    assert remote["torch"] == []

    local = MedSAMBridge("litemedsam", None, "cpu", segmenter=shared_segmenter("litemedsam", None, "cpu"))
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    _, first = local.segment(ct, seg, box_ras=corners, mode="3d")
    z, (x0, y0, x1, y1) = first.prompt.z, first.prompt.box
    fixed = local.compute(local.correction_request(first, BoxPrompt(z - 1, (x0 + 2, y0 + 2, x1 - 2, y1 - 2))))
    assert np.array_equal(np.load(tmp_path / "first.npy"), first.mask) and first.mask.any()
    assert np.array_equal(np.load(tmp_path / "fixed.npy"), fixed.mask)
    for name, record in (("first", first.record), ("fixed", fixed.record)):
        theirs = remote[name]
        assert {k for k, v in record.tags().items() if theirs[k] != v} <= {"MedSAM.Date", "MedSAM.Job"}, name


def test_slicer_remote_panel_tests_the_connection_and_segments_without_torch(server, ct_sm_path, ct_sm_seg_path,
                                                                             tmp_path):
    """The module's *Where the model runs* panel, replayed on strict stand-ins (slicer_replay.py)
    in a Python where torch cannot be imported, against the real server: without a URL, with a
    wrong token and with the right one, *Test connection* answers one line each (asked in a worker
    thread, the panel's timer pumping); the token typed is not written to Slicer's settings; the
    panel's *Segment* runs on the server and adds the local bridge's mask."""
    pytest.importorskip("slicer")
    import slicer
    import slicer_replay
    from slicer_helpers import ijk_to_ras, label_box_ijk

    from MedSAMBridgeLib.headless import create_headless_scene, load_volume
    from MedSAMBridgeLib.MRMLBridge import MedSAMBridge
    from MedSAMSlicerLib.segmenter import shared_segmenter

    create_headless_scene()
    ct = load_volume(ct_sm_path, "CT")
    labels = load_volume(ct_sm_seg_path, "labels", labelmap=True)
    lo, hi = label_box_ijk(slicer.util.arrayFromVolume(labels) == LIVER, (17, 19))
    lo, hi = lo - 0.5, hi + 0.5
    matrix = ijk_to_ras(ct)
    roi = {"center": [float(v) for v in (matrix @ np.r_[(lo + hi) / 2, 1.0])[:3]],
           "size": [float(v) for v in (hi - lo) * np.linalg.norm(matrix[:3, :3], axis=0)]}
    install = slicer_replay.install_extension(tmp_path / "ext")
    out = tmp_path / "panel.npy"
    args = {"url": server, "token": TOKENS[2], "volume": str(ct_sm_path), "roi": roi, "out": str(out)}
    done = subprocess.run([sys.executable, slicer_replay.__file__, str(install), "--remote-panel", json.dumps(args)],
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["failures"] and not report["messages"], report
    assert report["without_url"] == "Remote: give the server's URL, e.g. https://gpu.example.org:8765"
    wrong = report["wrong_token"]
    assert wrong.startswith("Cannot use the server: ") and "refused the token" in wrong and "\n" not in wrong, wrong
    assert report["right_token"].startswith("connected: medsam-slicer"), report["right_token"]
    assert "\n" not in report["right_token"] and TOKENS[2] not in report["backend"]
    assert report["settings"].get("MedSAM/ServerToken", "") == ""  # typed, not remembered
    assert report["settings"]["MedSAM/ServerURL"] == server
    assert report["running"] and report["status"].startswith("Added segment 'liver'"), report["status"]
    assert report["torch"] == []

    local = MedSAMBridge("litemedsam", None, "cpu", segmenter=shared_segmenter("litemedsam", None, "cpu"))
    roi_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi_node.SetCenter(*roi["center"])
    roi_node.SetSize(*roi["size"])
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct)
    sid, _ = local.segment(ct, seg, roi_node=roi_node, mode="3d", window="auto")
    expected = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, ct) > 0
    assert expected.any() and np.array_equal(np.load(out), expected)
