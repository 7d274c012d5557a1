"""Prepacked copies: a big version switches to the host's copy, made once in a helper process, which every
serving process maps, and which goes with the last version using it."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import onnx_models
from harness import wait_until
from mds_grpc.config import load_settings
from mds_grpc.core.inference import InferenceEngine
from mds_grpc.core.prepacked import DATA_FILE, LINKS
from mds_grpc.core.records import StoredFile
from mds_grpc.core.uploads import UploadHeader
from mds_grpc.server import build_core

SIDE = "model.onnx.data"


def processes(data: Path, count: int = 2):
    """The registries of `count` serving processes of one host (one data folder), copies from 64 KiB on."""
    settings = load_settings(data_dir=data, shared_weights_min_bytes=65536, model_cache_bytes=1 << 30)
    registries = [build_core(settings, f"models/process-{i}").registry for i in range(count)]
    for registry in registries:
        registry.sweep_local_copies()
    return registries


async def files_of(path: Path):
    for name, file in (("model.onnx", path), (SIDE, path.parent / SIDE)):
        yield name, file.read_bytes()


def mapped_inodes(suffix: str) -> set[int]:
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {int(fields[4]) for fields in map(str.split, lines) if fields[-1].endswith(suffix)}


async def test_a_big_version_runs_on_the_hosts_prepacked_copy(tmp_path):
    first, second = processes(tmp_path / "data")
    path = onnx_models.save_with_external_data(tmp_path / "model", rows=256, columns=128)  # 128 KiB of weights
    header = UploadHeader(name="big", external_files=(StoredFile(SIDE, "", 0),))
    await first.upload(header, files_of(path))
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    engine = InferenceEngine(first, ThreadPoolExecutor(1))
    before = (await engine.predict("big", 0, {"x": x})).outputs[0][1]  # loads lean: the host has no copy yet

    await first.cache.settle()  # the helper process made the copy; the version switched to it
    copies = list((tmp_path / "data" / "prepacked").glob("[0-9a-f]*"))
    assert len(copies) == 1
    copy = os.stat(copies[0] / DATA_FILE)
    after = (await engine.predict("big", 0, {"x": x})).outputs[0][1]
    np.testing.assert_array_equal(after, before)
    assert copy.st_ino in mapped_inodes(f"{LINKS}/{DATA_FILE}")

    loaded = await second.load("big")  # another process: on the copy at once, nothing more to make
    assert not second.cache._packing
    second_run = await InferenceEngine(second, ThreadPoolExecutor(1)).predict("big", 0, {"x": x})
    np.testing.assert_array_equal(second_run.outputs[0][1], before)
    links = second.cache.folder_root / "big" / "1" / LINKS / DATA_FILE
    assert os.stat(links).st_ino == copy.st_ino and os.stat(links).st_nlink == 3  # the copy and two folders
    assert loaded.session.providers == ("cpu",)


async def test_the_copy_goes_with_the_last_version_using_it(tmp_path):
    (registry,) = processes(tmp_path / "data", 1)
    path = onnx_models.save_with_external_data(tmp_path / "model", rows=256, columns=128)
    await registry.upload(UploadHeader(name="big", external_files=(StoredFile(SIDE, "", 0),)), files_of(path))
    await registry.load("big")
    await registry.cache.settle()
    root = tmp_path / "data" / "prepacked"
    assert len(list(root.glob("[0-9a-f]*"))) == 1
    await registry.delete("big", 1)
    wait_until(lambda: not any(root.iterdir()), what="the copy and its lock file to go")


async def test_a_copy_left_half_made_is_removed_at_the_next_start(tmp_path):
    root = tmp_path / "data" / "prepacked"
    (root / f".{'0' * 64}.1234.part").mkdir(parents=True)  # as a process killed while making it leaves it
    processes(tmp_path / "data", 1)
    assert not any(root.iterdir())


async def test_without_copies_a_big_version_keeps_its_session(tmp_path):
    settings = load_settings(data_dir=tmp_path / "data", shared_weights_min_bytes=65536, prepacked_copies=False)
    registry = build_core(settings).registry
    path = onnx_models.save_with_external_data(tmp_path / "model", rows=256, columns=128)
    await registry.upload(UploadHeader(name="big", external_files=(StoredFile(SIDE, "", 0),)), files_of(path))
    await registry.load("big")
    assert not registry.cache._packing and not (tmp_path / "data" / "prepacked").exists()
