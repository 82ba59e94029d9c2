"""Which adapters the server knows, which are resident in memory, and which paths it may load from.

The registry is bookkeeping only: it calls `load(name, path)` / `unload(name)` (supplied by the engine,
which owns the model) and must only be mutated from the engine thread. A lock guards the tables so
HTTP handlers can list models while the engine runs.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from lorakit.adapter_folder import CONFIG_NAME, is_adapter_dir
from lorakit.errors import AdapterLoadError, LoraKitError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterPathError(LoraKitError, PermissionError):
    """A path the server refuses to load an adapter from."""


class UnknownAdapterError(LoraKitError, KeyError):
    """A model name that is neither the base nor a known adapter."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AdapterBusyError(LoraKitError, RuntimeError):
    """Every resident adapter slot is pinned by running requests."""


@dataclass
class AdapterInfo:
    name: str
    path: Path  # real (symlink-free) path of the adapter directory
    source: str  # "cli" (--adapter), "dir" (found in --adapter-dir), "api" (load_lora_adapter)
    resident: bool = False
    refcount: int = 0  # sequences (waiting or running) that use it; a pinned adapter is never evicted
    last_used: int = 0
    removed: bool = False  # unloaded through the API while in use: dropped when refcount reaches 0
    created: int = field(default_factory=lambda: int(time.time()))
    load_error: Optional[str] = None  # why the last load failed; cleared by a successful load


def _dir_adapter(name: str, path: Path) -> AdapterInfo:
    # Found in an adapter dir: `created` is the folder's mtime, so listing it twice gives the same value
    # whether or not a request has registered it in between.
    try:
        return AdapterInfo(name, path, "dir", created=int(path.stat().st_mtime))
    except OSError:  # removed since the scan; a later lookup will not find it
        return AdapterInfo(name, path, "dir")


def check_name(name: str, base_name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"Invalid adapter name {name!r}: use 1-64 characters from letters, digits, '.', '_', '-' "
                         "(starting with a letter or digit).")
    if name == base_name:
        raise ValueError(f"Adapter name {name!r} is the base model's name; choose another name.")


def _inside(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def safe_adapter_path(path: str, roots: list[Path]) -> Path:
    """The real path of adapter directory `path` if it lies inside one of `roots`, else AdapterPathError.

    `path` is absolute or relative to a root. `..` is refused outright; symlinks are resolved, so a link
    that points outside the roots is refused too, and so are adapter files that are links to outside.
    """
    if not roots:
        raise AdapterPathError("Loading adapters at run time is disabled: start the server with "
                               "--adapter-dir DIR and put adapters in DIR.")
    raw = Path(path)
    if ".." in raw.parts:
        raise AdapterPathError(f"Adapter path {path!r} contains '..'; give a path inside an adapter directory.")
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    allowed = ", ".join(str(r) for r in roots)
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        root = next((r for r in roots if _inside(real, r)), None)
        if root is None:
            continue
        if not real.is_dir():
            raise AdapterPathError(f"Adapter path {path!r} is not a directory inside {root}.")
        for entry in real.iterdir():
            target = Path(os.path.realpath(entry))
            if not _inside(target, root):
                raise AdapterPathError(f"Adapter file {entry.name} in {path!r} is a link to {target}, outside "
                                       f"the adapter directories ({allowed}); refusing to load it.")
        return real
    raise AdapterPathError(f"Adapter path {path!r} is outside the configured adapter directories ({allowed}).")


class AdapterRegistry:
    """Known adapters, at most `max_resident` in memory, least-recently-used evicted first."""

    def __init__(self, base_name: str, adapter_dirs: list[str], max_resident: int,
                 load: Callable[[str, Path], None], unload: Callable[[str], None],
                 on_change: Optional[Callable[["AdapterRegistry"], None]] = None):
        if max_resident < 1:
            raise ValueError("--max-adapters must be at least 1.")
        self.base_name = base_name
        self.roots = []
        for d in adapter_dirs:
            real = Path(os.path.realpath(d))
            if not real.is_dir():
                raise FileNotFoundError(f"--adapter-dir {d} does not exist or is not a directory.")
            self.roots.append(real)
        self.max_resident = max_resident
        self._load, self._unload, self._on_change = load, unload, on_change
        self._adapters: dict[str, AdapterInfo] = {}
        self._clock = 0
        self.lock = threading.RLock()
        self.loads = 0
        self.evictions = 0

    # -- lookups (any thread) -------------------------------------------------------------------------
    def _in_dirs(self, name: str) -> Optional[Path]:
        if not NAME_RE.match(name):
            return None
        for root in self.roots:
            candidate = root / name
            if is_adapter_dir(candidate):
                try:
                    return safe_adapter_path(str(candidate), self.roots)
                except AdapterPathError:
                    return None
        return None

    def get(self, name: str) -> AdapterInfo:
        """The adapter called `name`, registering it if it is a folder of an adapter dir."""
        with self.lock:
            info = self._adapters.get(name)
            if info is not None and not info.removed:
                return info
            path = self._in_dirs(name)
            if path is None:
                raise UnknownAdapterError(f"The model '{name}' does not exist. Available: "
                                          f"{', '.join(self.available()) }.")
            if info is not None:  # removed but still draining: a new entry would clash; wait for drain
                raise AdapterBusyError(f"Adapter '{name}' is being unloaded; retry in a moment.")
            info = self._adapters[name] = _dir_adapter(name, path)
            return info

    def exists(self, name: str) -> bool:
        with self.lock:
            info = self._adapters.get(name)
            return (info is not None and not info.removed) or self._in_dirs(name) is not None

    def available(self) -> list[str]:
        """The base name, then every adapter name a request may use (resident or loadable, not failed)."""
        return [self.base_name] + [info.name for info in self.list() if info.load_error is None]

    def list(self) -> list[AdapterInfo]:
        with self.lock:
            infos = {n: i for n, i in self._adapters.items() if not i.removed}
            for root in self.roots:
                for child in sorted(root.iterdir()):
                    if child.name not in infos and NAME_RE.match(child.name) and is_adapter_dir(child):
                        path = self._in_dirs(child.name)
                        if path is not None:
                            infos[child.name] = _dir_adapter(child.name, path)
            return sorted(infos.values(), key=lambda i: i.name)

    def resident(self) -> list[str]:
        with self.lock:
            return [n for n, i in self._adapters.items() if i.resident]

    # -- mutations (engine thread only) ---------------------------------------------------------------
    def configure(self, name: str, path: str) -> AdapterInfo:
        """Register an adapter given on the command line (trusted: may live outside the adapter dirs)."""
        check_name(name, self.base_name)
        real = Path(os.path.realpath(path))
        if not is_adapter_dir(real):
            raise FileNotFoundError(f"--adapter {name}={path}: no {CONFIG_NAME} in {real}.")
        with self.lock:
            if name in self._adapters:
                raise ValueError(f"--adapter {name} is given twice.")
            info = self._adapters[name] = AdapterInfo(name, real, "cli")
            return info

    def register(self, name: str, path: str) -> AdapterInfo:
        """POST /v1/load_lora_adapter: a new name for an adapter inside the adapter dirs, loaded now."""
        check_name(name, self.base_name)
        real = safe_adapter_path(path, self.roots)
        if not is_adapter_dir(real):
            raise AdapterPathError(f"Adapter path {path!r} has no {CONFIG_NAME}.")
        with self.lock:
            existing = self._adapters.get(name)
            if existing is not None and not existing.removed:
                if existing.path == real:
                    self._make_resident(existing)
                    return existing
                raise ValueError(f"An adapter named '{name}' is already loaded from {existing.path}; "
                                 "unload it first or choose another name.")
            if existing is not None:
                raise AdapterBusyError(f"Adapter '{name}' is being unloaded; retry in a moment.")
            # An adapter dir's folder loaded under its own name is that on-demand adapter, made resident now: a
            # failed load stays listed with its reason, as when a request loads it.
            own_folder = self._in_dirs(name) == real
            info = _dir_adapter(name, real) if own_folder else AdapterInfo(name, real, "api")
            self._adapters[name] = info
            try:
                self._make_resident(info)
            except BaseException:
                if not (own_folder and info.load_error is not None):
                    del self._adapters[name]
                raise
            return info

    def acquire(self, name: str) -> bool:
        """Pin adapter `name` for one sequence; load it (evicting the LRU unpinned one) if needed.

        Returns False when it is not resident and every resident adapter is pinned: try again later.
        Raises AdapterLoadError when its files cannot be loaded; then no other adapter was evicted.
        """
        with self.lock:
            info = self.get(name)
            if not info.resident and not self._load_into_slot(info):
                return False
            info.refcount += 1
            self._clock += 1
            info.last_used = self._clock
            return True

    def release(self, name: str) -> None:
        with self.lock:
            info = self._adapters.get(name)
            if info is None:
                return
            info.refcount = max(0, info.refcount - 1)
            if info.removed and info.refcount == 0:
                self._drop(info)

    def remove(self, name: str) -> bool:
        """POST /v1/unload_lora_adapter. True if unloaded now, False if it drains with its requests."""
        with self.lock:
            info = self._adapters.get(name)
            if info is None or info.removed or (info.source == "dir" and not info.resident):
                if self._in_dirs(name) is not None:
                    raise UnknownAdapterError(f"Adapter '{name}' is not loaded (it stays available on demand "
                                              "from the adapter directory).")
                raise UnknownAdapterError(f"Adapter '{name}' is not loaded.")
            info.removed = True
            if info.refcount == 0:
                self._drop(info)
                return True
            return False

    def _make_resident(self, info: AdapterInfo) -> None:
        if info.resident:
            return
        if not self._load_into_slot(info):
            raise AdapterBusyError(f"All {self.max_resident} adapter slots (--max-adapters) are in use by running "
                                   "requests; retry when they finish.")
        self._clock += 1
        info.last_used = self._clock

    def _load_into_slot(self, info: AdapterInfo) -> bool:
        """Load `info`, then evict the least recently used idle adapter if that went over the limit.

        False (nothing loaded) when every slot is pinned. Loading comes first so that an adapter whose
        files turn out broken or made for another base never costs a healthy adapter its slot; the price
        is one adapter over --max-adapters for the length of a load.
        """
        resident = [i for i in self._adapters.values() if i.resident]
        if len(resident) >= self.max_resident and all(i.refcount > 0 for i in resident):
            return False
        self._do_load(info)
        if len(resident) >= self.max_resident:
            victim = min((i for i in resident if i.refcount == 0), key=lambda i: i.last_used)
            self._unload(victim.name)
            victim.resident = False
            self.evictions += 1
            self._changed()
        return True

    def _do_load(self, info: AdapterInfo) -> None:
        try:
            self._load(info.name, info.path)
        except (LoraKitError, ValueError, OSError) as exc:  # the adapter's files, not the server, are at fault
            info.load_error = f"Adapter '{info.name}' in {info.path} could not be loaded: {exc}"
            raise AdapterLoadError(info.load_error) from exc
        info.resident = True
        info.load_error = None
        self.loads += 1
        self._changed()

    def _drop(self, info: AdapterInfo) -> None:
        if info.resident:
            self._unload(info.name)
            info.resident = False
        del self._adapters[info.name]
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)
