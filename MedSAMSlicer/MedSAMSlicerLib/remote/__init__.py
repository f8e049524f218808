"""The engine over a network: ``medsam-slicer serve`` (:mod:`.server`, FastAPI) and its clients
(:mod:`.client`, the standard library only, so Slicer needs no new package).

* :mod:`.protocol`: the messages (volumes, prompts, results) and the version rule, torch-free.
* :mod:`.sessions`: the server's state: sessions, jobs, the fair queue, the rate limit.
* :mod:`.server`: the HTTP routes, the token check, TLS, ``serve``.
* :mod:`.client`: :class:`~.client.RemoteSegmenter`, a :class:`~MedSAMSlicerLib.segmenter.Segmenter`
  that runs on a server: the command line (``segment --server URL``) and the Slicer bridge use it
  in place of a local one, so results and records are made by the same code.

docs/remote.md says how to use and run it.
"""
