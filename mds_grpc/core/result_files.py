"""A job result file: one .npz of the outputs of a run of rows, with the dtype names .npz cannot keep."""

from pathlib import Path

import numpy as np

from mds_grpc.core import dtypes

LEGACY_VOID = {2: "BF16"}  # files written without dtype names held this extension type only


def save(path: Path, outputs: list[np.ndarray]) -> None:
    names = [getattr(dtypes.of_array(a), "name", "") for a in outputs]
    np.savez(path, *outputs, dtypes=np.array(names))  # arr_0, arr_1, ... in the job's output order


def load(path: Path, count: int) -> list[np.ndarray]:
    """The `count` outputs saved at `path`, extension types (stored as raw bytes) viewed back as themselves."""
    with np.load(path, allow_pickle=False) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(count)]
        names = saved["dtypes"].tolist() if "dtypes" in saved.files else [""] * count
    return [
        a.view(dtypes.BY_NAME[name or LEGACY_VOID[a.dtype.itemsize]].numpy) if a.dtype.kind == "V" else a
        for a, name in zip(arrays, names, strict=True)
    ]
