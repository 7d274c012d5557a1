"""A job result file: one .npz of the outputs of a run of rows, with the dtype names .npz cannot keep."""

import zipfile
from pathlib import Path

import numpy as np

from mds_grpc.core import dtypes

LEGACY_VOID = {2: "BF16"}  # files written without dtype names held this extension type only


def save(path: Path, outputs: list[np.ndarray]) -> None:
    names = [getattr(dtypes.of_array(a), "name", "") for a in outputs]
    np.savez(path, *outputs, dtypes=np.array(names))  # arr_0, arr_1, ... in the job's output order


def save_batches(path: Path, batches: list[list[np.ndarray]]) -> None:
    """The outputs of consecutive batches (each a list in the job's output order, rows of one shape per output)
    as one file, as `save` would write their concatenation: each output's rows are written batch after batch,
    never copied into one array first."""
    if len(batches) == 1 or any(a.dtype.hasobject for a in batches[0]):
        save(path, batches[0] if len(batches) == 1 else [np.concatenate(parts) for parts in zip(*batches, strict=True)])
        return
    names = np.array([getattr(dtypes.of_array(a), "name", "") for a in batches[0]])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for i, parts in enumerate(zip(*batches, strict=True)):
            parts = tuple(np.ascontiguousarray(part) for part in parts)
            header = np.lib.format.header_data_from_array_1_0(parts[0])
            header["shape"] = (sum(len(part) for part in parts), *parts[0].shape[1:])
            with archive.open(f"arr_{i}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for part in parts:
                    if part.size:
                        member.write(part.reshape(-1).view(np.uint8))
        with archive.open("dtypes.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, names, allow_pickle=False)


def load(path: Path, count: int) -> list[np.ndarray]:
    """The `count` outputs saved at `path`, extension types (stored as raw bytes) viewed back as themselves."""
    with np.load(path, allow_pickle=False) as saved:
        arrays = [saved[f"arr_{i}"] for i in range(count)]
        names = saved["dtypes"].tolist() if "dtypes" in saved.files else [""] * count
    return [
        a.view(dtypes.BY_NAME[name or LEGACY_VOID[a.dtype.itemsize]].numpy) if a.dtype.kind == "V" else a
        for a, name in zip(arrays, names, strict=True)
    ]
