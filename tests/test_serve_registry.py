"""Adapter registry: path safety and LRU residency, with recording load/unload callbacks."""

from __future__ import annotations

import itertools
import os

import pytest

from lorakit.errors import AdapterLoadError
from lorakit.serve import registry as registry_module
from lorakit.serve.registry import (AdapterBusyError, AdapterPathError, AdapterRegistry, UnknownAdapterError,
                                    safe_adapter_path)


def fake_adapter(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "adapters"
    for name in ("a", "b", "c", "d"):
        fake_adapter(root / name)
    fake_adapter(root / "team" / "nested")
    outside = fake_adapter(tmp_path / "outside" / "x")
    os.symlink(outside, root / "link-out")
    os.symlink(root / "a", root / "link-in")
    fake_adapter(root / "file-out")
    os.remove(root / "file-out" / "adapter_model.safetensors")
    os.symlink(outside / "adapter_model.safetensors", root / "file-out" / "adapter_model.safetensors")
    return root, outside


def registry(root, max_resident=2, log=None):
    log = [] if log is None else log
    return AdapterRegistry("base", [str(root)], max_resident,
                           load=lambda name, path: log.append(("load", name)),
                           unload=lambda name: log.append(("unload", name))), log


def test_safe_paths_inside_are_resolved(tree):
    root, _ = tree
    real_root = root.resolve()
    assert safe_adapter_path("a", [real_root]) == real_root / "a"
    assert safe_adapter_path(str(root / "b"), [real_root]) == real_root / "b"
    assert safe_adapter_path("team/nested", [real_root]) == real_root / "team" / "nested"
    assert safe_adapter_path("link-in", [real_root]) == real_root / "a"  # a link that stays inside is fine


@pytest.mark.parametrize("path,match", [
    ("../outside/x", r"contains '\.\.'"),
    ("a/../b", r"contains '\.\.'"),
    ("link-out", "outside the configured adapter directories"),
    ("file-out", "is a link to .* outside the adapter directories"),
    ("/etc", "outside the configured adapter directories"),
    ("", "outside the configured adapter directories"),  # the root itself is not an adapter
    ("missing", "outside the configured|not a directory"),
])
def test_unsafe_paths_are_refused(tree, path, match):
    root, outside = tree
    with pytest.raises(AdapterPathError, match=match):
        safe_adapter_path(path, [root.resolve()])
    with pytest.raises(AdapterPathError):
        safe_adapter_path(str(outside), [root.resolve()])


def test_no_adapter_dir_means_no_runtime_loading(tree):
    with pytest.raises(AdapterPathError, match="--adapter-dir"):
        safe_adapter_path("a", [])


def test_lru_eviction_skips_pinned_adapters(tree):
    root, _ = tree
    reg, log = registry(root, max_resident=2)
    assert reg.acquire("a") and reg.acquire("b")  # both pinned
    assert reg.acquire("c") is False  # no idle slot: the caller waits
    reg.release("b")
    assert reg.acquire("c")  # b (idle) is evicted once c has loaded, a (pinned) stays
    assert log == [("load", "a"), ("load", "b"), ("load", "c"), ("unload", "b")]
    reg.release("a")
    reg.release("c")
    assert reg.acquire("c")
    reg.release("c")
    assert reg.acquire("d")  # a is now the least recently used
    assert log[-2:] == [("load", "d"), ("unload", "a")]
    assert sorted(reg.resident()) == ["c", "d"] and reg.evictions == 2 and reg.loads == 4


def test_listing_and_unknown_names(tree):
    root, _ = tree
    reg, _ = registry(root)
    names = [i.name for i in reg.list()]
    assert names == ["a", "b", "c", "d", "link-in"]  # link-out and file-out lead outside: not offered
    assert reg.available()[0] == "base"
    with pytest.raises(UnknownAdapterError, match="'zzz' does not exist"):
        reg.acquire("zzz")
    with pytest.raises(UnknownAdapterError):
        reg.acquire("link-out")


def test_register_and_remove(tree):
    root, _ = tree
    reg, log = registry(root, max_resident=2)
    reg.register("support", "a")
    assert reg.resident() == ["support"] and reg.get("support").source == "api"
    with pytest.raises(ValueError, match="already loaded"):
        reg.register("support", "b")
    with pytest.raises(ValueError, match="base model's name"):
        reg.register("base", "b")
    with pytest.raises(ValueError, match="Invalid adapter name"):
        reg.register("../x", "b")
    # In use: the unload waits for the request to finish.
    assert reg.acquire("support")
    assert reg.remove("support") is False
    assert not reg.exists("support") and ("unload", "support") not in log
    reg.release("support")
    assert ("unload", "support") in log and reg.resident() == []
    with pytest.raises(UnknownAdapterError, match="not loaded"):
        reg.remove("support")
    with pytest.raises(UnknownAdapterError, match="available on demand"):
        reg.remove("c")


def test_register_when_all_slots_are_pinned(tree):
    root, _ = tree
    reg, _ = registry(root, max_resident=1)
    assert reg.acquire("a")
    with pytest.raises(AdapterBusyError, match="--max-adapters"):
        reg.register("x", "b")
    assert not reg.exists("x")


def test_failed_load_leaves_no_entry(tree):
    root, _ = tree

    def load(name, path):
        raise ValueError("shape mismatch")

    reg = AdapterRegistry("base", [str(root)], 2, load=load, unload=lambda name: None)
    with pytest.raises(ValueError, match="shape mismatch"):
        reg.register("x", "a")
    assert not reg.exists("x") and reg.resident() == []
    with pytest.raises(ValueError, match="shape mismatch"):
        reg.acquire("b")
    assert reg.resident() == [] and reg.get("b").refcount == 0


def test_failed_load_evicts_nothing_and_is_reported(tree):
    root, _ = tree
    broken, log = {"b"}, []

    def load(name, path):
        if path.name in broken:
            raise ValueError(f"tensor of {path.name} has shape (8, 32), this model expects (8, 64)")
        log.append(("load", name))

    reg = AdapterRegistry("base", [str(root)], 1, load=load, unload=lambda name: log.append(("unload", name)))
    assert reg.acquire("a")
    reg.release("a")  # idle: the LRU victim if b needed its slot
    with pytest.raises(AdapterLoadError, match=r"'b' .* could not be loaded: tensor of b has shape"):
        reg.acquire("b")
    with pytest.raises(AdapterLoadError):
        reg.register("b-again", "b")
    assert log == [("load", "a")] and reg.resident() == ["a"] and reg.evictions == 0
    # Listed with its error, and no longer offered as available; fixing its files makes it load again.
    assert "shape (8, 32)" in {i.name: i for i in reg.list()}["b"].load_error
    assert "b" not in reg.available() and "c" in reg.available()
    broken.clear()
    assert reg.acquire("b")
    assert reg.get("b").load_error is None and log[-2:] == [("load", "b"), ("unload", "a")]


def test_created_is_stable_for_adapters_never_used(tree, monkeypatch):
    root, _ = tree
    clock = itertools.count(1_700_000_000, 100)
    monkeypatch.setattr(registry_module.time, "time", lambda: next(clock))
    reg, _ = registry(root)
    first = {i.name: i.created for i in reg.list()}
    assert first == {i.name: i.created for i in reg.list()}
    assert reg.acquire("c")  # registering it on first use keeps the date it was listed with
    assert {i.name: i.created for i in reg.list()} == first
    assert first["c"] == int((root / "c").stat().st_mtime)
