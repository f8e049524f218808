"""The one least-recently-used store of slice embeddings under a memory cap, with caps per group.

Both embedding caches (:class:`~MedSAMSlicerLib.segmentation.predictor.EmbeddingCache` for
LiteMedSAM/MedSAM, :class:`~MedSAMSlicerLib.segmentation.medsam2.FeatureCache` for MedSAM2) are
this store with their own sizes. A local run uses only the overall cap (``max_bytes``). A server
(``medsam-slicer serve``) also gives each session a cap of its own:

* while a job runs, the store works for that job's session (:meth:`MemoryLRU.working_for`); every
  embedding stored or used then **belongs to that session** (an embedding belongs to the session
  that used it last, so two sessions of one user on the same volume share it without counting it
  twice);
* a session over its cap loses its own least recently used embeddings, never another session's;
* above all sessions, the overall cap (``max_bytes``) evicts the least recently used embedding of
  any session (a ceiling, so the sum of the sessions' caps may exceed the memory there is);
* an evicted embedding is computed again when it is next needed: only time is lost, never a result
  (the encoder is deterministic, so the mask is the same);
* a closed session's embeddings stay, belonging to no session, until the overall cap needs room
  (:meth:`MemoryLRU.release`): the next session on the same volume and window uses them.

Torch-free: sizes come from the subclass (:meth:`MemoryLRU._size`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Dict, Hashable, Iterator, List, Optional

#: The group of entries that belong to no session (local runs; closed sessions).
NO_GROUP: Optional[Hashable] = None


class MemoryLRU:
    """Entries ``key -> value``, least recently used first out, under ``max_bytes`` overall and, for
    entries used while :meth:`working_for` a group, under that group's cap.

    At least the most recently used entry always stays (a cap smaller than one embedding keeps one).
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: Dict[Hashable, int] = {}
        self._owner: Dict[Hashable, Optional[Hashable]] = {}
        self._groups: Dict[Optional[Hashable], OrderedDict[Hashable, None]] = {}
        self._group_bytes: Dict[Optional[Hashable], int] = {}
        self._caps: Dict[Hashable, int] = {}
        self._counts: Dict[Optional[Hashable], List[int]] = {}  # [stored, evicted]
        self._bytes = 0
        self._group: Optional[Hashable] = NO_GROUP
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    # -- what a subclass says ------------------------------------------------------------------
    def _size(self, value: Any) -> int:
        """Bytes ``value`` holds."""
        raise NotImplementedError

    def _may_evict(self) -> bool:
        """Whether entries may be evicted now (MedSAM2 holds them during a job)."""
        return True

    # -- the map -------------------------------------------------------------------------------
    def get(self, key: Hashable) -> Optional[Any]:
        """The value for ``key`` (now the most recently used, and the current group's), or ``None``."""
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._touch(key)
            self._evict()
            return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` for the current group; evict beyond the caps."""
        with self._lock:
            self._store(key, value)

    def _store(self, key: Hashable, value: Any) -> None:
        if key in self._items:
            self._drop(key)
        size = int(self._size(value))
        self._items[key] = value
        self._sizes[key] = size
        self._bytes += size
        group = self._group
        self._owner[key] = group
        self._groups.setdefault(group, OrderedDict())[key] = None
        self._group_bytes[group] = self._group_bytes.get(group, 0) + size
        self._counts.setdefault(group, [0, 0])[0] += 1
        self._evict()

    def _touch(self, key: Hashable) -> None:
        """``key`` was used now, by the current group."""
        self._items.move_to_end(key)
        old, new = self._owner[key], self._group
        if old != new:
            size = self._sizes[key]
            self._forget(old, key, size)
            self._owner[key] = new
            self._groups.setdefault(new, OrderedDict())[key] = None
            self._group_bytes[new] = self._group_bytes.get(new, 0) + size
        else:
            self._groups[new].move_to_end(key)

    def _forget(self, group: Optional[Hashable], key: Hashable, size: int) -> None:
        members = self._groups.get(group)
        if members is not None:
            members.pop(key, None)
            self._group_bytes[group] -= size
            if not members and group is not NO_GROUP and group not in self._caps:
                del self._groups[group], self._group_bytes[group]

    def _drop(self, key: Hashable, evicted: bool = False) -> None:
        self._items.pop(key)
        size = self._sizes.pop(key)
        self._bytes -= size
        group = self._owner.pop(key)
        if evicted:
            self._counts.setdefault(group, [0, 0])[1] += 1
        self._forget(group, key, size)

    def _evict(self) -> None:
        """The current group's own least recently used entries beyond its cap, then anyone's beyond
        the overall cap."""
        if not self._may_evict():
            return
        group = self._group
        cap = self._caps.get(group) if group is not NO_GROUP else None
        if cap is not None:
            members = self._groups.get(group, {})
            while self._group_bytes.get(group, 0) > cap and len(members) > 1:
                self._drop(next(iter(members)), evicted=True)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            self._drop(next(iter(self._items)), evicted=True)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            for key in list(self._items):
                self._drop(key)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    # -- groups (a server's sessions) ----------------------------------------------------------
    @contextmanager
    def working_for(self, group: Hashable, max_bytes: int) -> Iterator[None]:
        """While the block runs, what is stored or used belongs to ``group``, whose entries stay
        under ``max_bytes`` (its own least recently used first out). One group at a time (the
        server's one worker)."""
        with self._lock:
            self._caps[group] = int(max_bytes)
            self._groups.setdefault(group, OrderedDict())
            self._group_bytes.setdefault(group, 0)
            previous, self._group = self._group, group
            self._evict()  # a cap made smaller since the group last ran
        try:
            yield
        finally:
            with self._lock:
                self._group = previous

    def release(self, group: Hashable) -> None:
        """``group`` is gone (a closed or expired session): its entries belong to no group now and
        go first when the overall cap needs room (they are the least recently used)."""
        with self._lock:
            self._caps.pop(group, None)
            self._counts.pop(group, None)
            for key in list(self._groups.get(group, ())):
                size = self._sizes[key]
                self._forget(group, key, size)
                self._owner[key] = NO_GROUP
                self._groups.setdefault(NO_GROUP, OrderedDict())[key] = None
                self._group_bytes[NO_GROUP] = self._group_bytes.get(NO_GROUP, 0) + size
            self._groups.pop(group, None)
            self._group_bytes.pop(group, None)

    def usage(self, group: Optional[Hashable] = NO_GROUP) -> Dict[str, Any]:
        """What ``group`` holds: ``entries``, ``bytes``, ``max_bytes`` (its cap; ``None``: only the
        overall one), ``stored`` (entries computed for it) and ``evicted`` (its entries evicted, by
        its cap or the overall one)."""
        with self._lock:
            stored, evicted = self._counts.get(group, (0, 0))
            return {"entries": len(self._groups.get(group, ())), "bytes": int(self._group_bytes.get(group, 0)),
                    "max_bytes": self._caps.get(group) if group is not NO_GROUP else None,
                    "stored": int(stored), "evicted": int(evicted)}
