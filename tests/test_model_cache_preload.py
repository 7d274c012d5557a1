"""The model cache records the versions it holds, most recently used first, and a new start preloads them."""

import asyncio
import json
import logging
import threading
from pathlib import Path

import onnx_models
from harness import parts
from mds_grpc.config import load_settings
from mds_grpc.core import model_cache
from mds_grpc.core.model_cache import ORDER_FILE, gather_orders, order_file, read_order, write_order
from mds_grpc.core.registry import ModelRegistry
from mds_grpc.core.uploads import UploadHeader
from mds_grpc.server import build_core


def started(folder: Path, **settings) -> ModelRegistry:
    """A registry on `folder` as `mds serve` starts it: local copies swept, the order file read."""
    registry = build_core(load_settings(data_dir=folder, **settings)).registry
    registry.sweep_local_copies()
    registry.cache.order_file = folder / ORDER_FILE
    registry.cache.recall()
    return registry


def recorded(folder: Path) -> list[tuple[str, int]]:
    return [(m["name"], m["version"]) for m in json.loads((folder / ORDER_FILE).read_text())["models"]]


async def uploaded(registry: ModelRegistry, *names: str) -> None:
    for scale, name in enumerate(names, 1):
        await registry.upload(UploadHeader(name=name), parts(onnx_models.add_two(float(scale))))


class CountedLoads:
    """Stands in for OnnxSession in the cache: records the model of each session made; `hold` blocks one."""

    def __init__(self, monkeypatch, hold: str = ""):
        self.names: list[str] = []
        self.hold, self.release = hold, threading.Event()
        real = model_cache.OnnxSession

        def session(path: Path, *args):
            self.names.append(path.parent.parent.name)
            if path.parent.parent.name == self.hold:
                self.release.wait(60)
            return real(path, *args)

        monkeypatch.setattr(model_cache, "OnnxSession", session)

    async def reached(self, name: str) -> None:
        for _ in range(3000):
            if name in self.names:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no load of {name} began")


async def test_loads_evictions_and_deletes_rewrite_the_order_but_hits_wait_for_shutdown(tmp_path):
    registry = started(tmp_path)
    assert not (tmp_path / ORDER_FILE).exists()
    await uploaded(registry, "one", "two", "three")  # each warmed by its upload
    assert recorded(tmp_path) == [("three", 1), ("two", 1), ("one", 1)]
    await registry.load("one")  # a hit
    assert recorded(tmp_path) == [("three", 1), ("two", 1), ("one", 1)]
    registry.cache.save_order()  # as at shutdown
    assert recorded(tmp_path) == [("one", 1), ("three", 1), ("two", 1)]
    await registry.delete("three")
    assert recorded(tmp_path) == [("one", 1), ("two", 1)]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    small = started(tmp_path / "small", model_cache_bytes=1)  # room for one version
    await uploaded(small, "one", "two")
    assert recorded(tmp_path / "small") == [("two", 1)]  # "one" evicted
    await small.load("one")
    assert recorded(tmp_path / "small") == [("one", 1)]


async def test_a_new_start_preloads_most_recent_first_and_a_request_joins_the_load(tmp_path, monkeypatch):
    before = started(tmp_path)
    await uploaded(before, "a", "b", "c")
    await before.load("a")
    await before.load("c")
    before.cache.save_order()

    after = started(tmp_path)
    assert after.cache.recall() == [("c", 1), ("a", 1), ("b", 1)]
    loads = CountedLoads(monkeypatch, hold="a")
    preloading = asyncio.ensure_future(after.cache.preload(after.get))
    await loads.reached("a")
    request = asyncio.ensure_future(after.cache.get(await after.get("a", 1)))  # asked for while it loads
    await asyncio.sleep(0)
    loads.release.set()
    await preloading
    assert (await request).record.name == "a"
    assert loads.names == ["c", "a", "b"]  # each loaded once, most recently used first
    after.cache.save_order()
    assert recorded(tmp_path) == [("a", 1), ("c", 1), ("b", 1)]  # "a" used by the request: now the most recent
    assert (await after.load("b")).record.name == "b" and loads.names == ["c", "a", "b"]  # a hit


async def test_deleted_versions_are_skipped_silently_and_a_failed_preload_is_one_warning(tmp_path, caplog):
    before = started(tmp_path)
    await uploaded(before, "kept", "broken", "gone")
    broken = (await before.get("broken", 1)).files[0].sha256
    before.cache.save_order()
    await before.delete("gone")  # also drops it from the file...
    (tmp_path / ORDER_FILE).write_text(  # ...so list it again, as a delete through another server would leave it
        json.dumps({"models": [{"name": n, "version": 1} for n in ("gone", "broken", "kept")]})
    )
    next(tmp_path.joinpath("blobs").rglob(broken)).write_bytes(b"not a model")

    after = started(tmp_path)
    with caplog.at_level(logging.INFO, "mds.model_cache"):
        await after.cache.preload(after.get)
    assert [(r.levelname, r.getMessage(), r.model) for r in caplog.records if r.getMessage() != "preloading done"] == [
        ("WARNING", "model not preloaded", "broken"),
        ("INFO", "model preloaded", "kept"),
    ]
    assert ("kept", 1) in after.cache and ("broken", 1) not in after.cache
    after.cache.save_order()
    assert recorded(tmp_path) == [("kept", 1)]  # what failed is not tried again at the next start


async def test_preloading_stops_at_the_cache_bound(tmp_path, caplog):
    before = started(tmp_path)
    await uploaded(before, "older", "newer")
    size = (await before.get("newer", 1)).total_bytes
    before.cache.save_order()
    after = started(tmp_path, model_cache_bytes=size + 1)
    with caplog.at_level(logging.INFO, "mds.model_cache"):
        await after.cache.preload(after.get)
    assert ("newer", 1) in after.cache and ("older", 1) not in after.cache
    assert "model not preloaded: the cache is full" in caplog.messages


async def test_versions_not_yet_preloaded_stay_recorded_when_the_server_stops(tmp_path, monkeypatch):
    before = started(tmp_path)
    await uploaded(before, "one", "two")
    before.cache.save_order()
    after = started(tmp_path)
    loads = CountedLoads(monkeypatch, hold="two")
    preloading = asyncio.ensure_future(after.cache.preload(after.get))
    await loads.reached("two")
    preloading.cancel()  # shutdown while the first preload runs
    after.cache.save_order()
    assert recorded(tmp_path) == [("two", 1), ("one", 1)]
    loads.release.set()


def test_a_corrupt_order_file_is_ignored_with_a_warning(tmp_path, caplog):
    registry = build_core(load_settings(data_dir=tmp_path)).registry
    registry.cache.order_file = tmp_path / ORDER_FILE
    for text in ("{not json", '{"models": [{"name": "a"}]}', '{"models": [{"name": "a", "version": -1}]}', "[]"):
        (tmp_path / ORDER_FILE).write_text(text)
        with caplog.at_level(logging.WARNING, "mds.model_cache"):
            assert registry.cache.recall() == []
    assert caplog.messages == ["ignoring the record of the models loaded before"] * 4
    (tmp_path / ORDER_FILE).unlink()
    assert registry.cache.recall() == []  # missing: nothing to say
    assert len(caplog.messages) == 4


def test_the_records_of_several_processes_are_merged_at_the_next_start(tmp_path, caplog):
    write_order(order_file(tmp_path, 0), [("a", 1), ("b", 1), ("c", 1)])
    write_order(order_file(tmp_path, 1), [("b", 1), ("d", 2)])
    order_file(tmp_path, 2).write_text("{")  # cut short: ignored
    write_order(order_file(tmp_path), [("old", 1)])  # a single process's, from before
    with caplog.at_level(logging.WARNING, "mds.model_cache"):
        assert gather_orders(tmp_path) == [("old", 1), ("a", 1), ("b", 1), ("d", 2), ("c", 1)]
    assert caplog.messages == ["ignoring the record of the models loaded before"]
    assert [p.name for p in tmp_path.iterdir()] == [ORDER_FILE]
    assert read_order(tmp_path / ORDER_FILE) == [("old", 1), ("a", 1), ("b", 1), ("d", 2), ("c", 1)]
