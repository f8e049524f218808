"""Where the model runs for Slicer: Local (torch in Slicer's Python) or Remote (a
``medsam-slicer serve``, through the torch-free :mod:`MedSAMSlicerLib.remote.client`). Qt-free:
the module reads and writes the settings named here; every decision is made here.

Where the token lives: never in the scene or its parameter nodes (a saved scene is shared; a
token is not). It comes from ``$MEDSAM_SLICER_TOKEN``, or is typed in the module and kept in
memory for this Slicer session only, or (the user ticks "Remember") in Slicer's per-user settings
file, as Slicer keeps its other per-user settings (``QSettings``: a file in the user's profile,
readable by the user's account; plain text, so the module says so).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from MedSAMSlicerLib.errors import MedSAMError

BACKENDS = ("local", "remote")
#: Slicer settings keys (per user, every scene).
SETTINGS_BACKEND = "MedSAM/Backend"
SETTINGS_SERVER_URL = "MedSAM/ServerURL"
SETTINGS_SERVER_TOKEN = "MedSAM/ServerToken"
SETTINGS_SERVER_CA = "MedSAM/ServerCA"
TOKEN_ENV = "MEDSAM_SLICER_TOKEN"


@dataclass(frozen=True)
class Backend:
    """Where the model runs.

    Attributes:
        kind: ``"local"`` or ``"remote"``.
        url: the server's URL (remote).
        token: the bearer token (remote; never shown in ``repr``).
        cafile: a CA file for a server with its own certificate (remote, optional).
        timeout: seconds a request may take (remote).
    """

    kind: str = "local"
    url: str = ""
    token: str = field(default="", repr=False)
    cafile: str = ""
    timeout: float = 60.0

    @property
    def remote(self) -> bool:
        return self.kind == "remote"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], session_token: str = "",
                      environ: Optional[Mapping[str, str]] = None) -> Backend:
        """The backend the user chose: ``settings`` (Slicer's, by the ``SETTINGS_*`` keys); the
        token typed this session first, then the remembered one, then ``$MEDSAM_SLICER_TOKEN``."""
        environ = os.environ if environ is None else environ
        kind = str(settings.get(SETTINGS_BACKEND) or "local").lower()
        token = session_token or str(settings.get(SETTINGS_SERVER_TOKEN) or "") or environ.get(TOKEN_ENV, "")
        return cls(kind if kind in BACKENDS else "local", str(settings.get(SETTINGS_SERVER_URL) or "").strip(),
                   token.strip(), str(settings.get(SETTINGS_SERVER_CA) or "").strip())

    def settings(self, remember_token: bool) -> Dict[str, str]:
        """What to write into Slicer's settings (the token only when the user asked to remember it;
        an empty value removes a remembered one)."""
        return {SETTINGS_BACKEND: self.kind, SETTINGS_SERVER_URL: self.url, SETTINGS_SERVER_CA: self.cafile,
                SETTINGS_SERVER_TOKEN: self.token if remember_token else ""}

    def check(self) -> None:
        """Raises MedSAMError: Remote without a URL, or with one that is not http(s)."""
        if self.kind not in BACKENDS:
            raise MedSAMError(f"unknown backend '{self.kind}'; choose Local or Remote")
        if self.remote and not self.url.lower().startswith(("http://", "https://")):
            raise MedSAMError("Remote: give the server's URL, e.g. https://gpu.example.org:8765")

    def segmenter(self):
        """A :class:`~MedSAMSlicerLib.remote.client.RemoteSegmenter` (remote only; torch-free): the
        server's model and speed are used."""
        self.check()
        if not self.remote:
            raise MedSAMError("the local backend has no server")
        from MedSAMSlicerLib.remote.client import RemoteSegmenter

        return RemoteSegmenter(self.url, self.token or None, self.timeout, self.cafile or None)

    def test_connection(self) -> str:
        """One line for the "Test connection" button.

        Raises:
            MedSAMError: why the server cannot be used, in words.
        """
        self.check()
        if not self.remote:
            return "Local: the model runs in Slicer (needs PyTorch)."
        from MedSAMSlicerLib.remote.client import check_connection

        return check_connection(self.url, self.token or None, min(self.timeout, 15.0), self.cafile or None)

    def describe(self) -> str:
        return "Local (PyTorch in Slicer)" if not self.remote else f"Remote: {self.url}"
