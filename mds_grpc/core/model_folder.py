"""Models found in a folder at start (`mds serve --model-dir`), registered like uploads unless already stored.

The folder holds `NAME.onnx` files and `NAME/` folders with a `model.onnx` beside its external data; each
is model NAME. A model whose latest stored version has the same files is left as it is, so restarts and
servers sharing the stores add a version only when the bytes change.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from mds_grpc.core.errors import InvalidArgument
from mds_grpc.core.records import MAIN_FILE, ModelRecord, StoredFile
from mds_grpc.core.registry import ModelRegistry
from mds_grpc.core.uploads import UploadHeader, check_name, sha256_of

CHUNK_BYTES = 4 << 20
log = logging.getLogger("mds.model_folder")


@dataclass(frozen=True)
class FolderModel:
    """One model of the folder: its files by their path inside the model's folder, the main file first."""

    name: str
    files: dict[str, Path]

    def hashed(self) -> tuple[StoredFile, ...]:
        return tuple(StoredFile(path, sha256_of(file), file.stat().st_size) for path, file in self.files.items())


def _side_files(folder: Path) -> dict[str, Path]:
    """Every non-empty regular file under `folder` but its main file; hidden entries are left out."""
    found = {}
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        if relative.as_posix() != MAIN_FILE and not hidden and file.is_file() and file.stat().st_size:
            found[relative.as_posix()] = file
    return found


def find_models(folder: Path, model_name: str = "") -> list[FolderModel]:
    """The models in `folder`; `model_name` renames the only one. InvalidArgument says what is wrong."""
    try:
        entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    except OSError as error:
        raise InvalidArgument(f"cannot read the model folder {str(folder)!r}: {error.strerror}") from None
    models = [
        FolderModel(entry.stem, {MAIN_FILE: entry}) for entry in entries if entry.suffix == ".onnx" and entry.is_file()
    ]
    models += [
        FolderModel(entry.name, {MAIN_FILE: entry / MAIN_FILE, **_side_files(entry)})
        for entry in entries
        if (entry / MAIN_FILE).is_file()
    ]
    if not models:
        raise InvalidArgument(
            f"no models in {str(folder)!r}: it needs NAME.onnx files or NAME/ folders holding {MAIN_FILE}"
        )
    if model_name:
        if len(models) > 1:
            raise InvalidArgument(
                f"MDS_MODEL_NAME names the only model of the folder, but {str(folder)!r} holds "
                f"{len(models)}: {', '.join(m.name for m in models)}"
            )
        models = [FolderModel(model_name, models[0].files)]
    names = [model.name for model in models]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise InvalidArgument(f"{str(folder)!r} holds both NAME.onnx and NAME/ for {', '.join(twice)}: keep one")
    for model in models:
        try:
            check_name(model.name)
        except InvalidArgument as error:
            raise InvalidArgument(f"{model.files[MAIN_FILE]}: {error}") from None
    return models


async def _parts(model: FolderModel) -> AsyncIterator[tuple[str, bytes]]:
    for path, file in model.files.items():
        with open(file, "rb") as handle:
            while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                yield path, chunk


async def register(registry: ModelRegistry, model: FolderModel) -> tuple[ModelRecord, bool]:
    """The model's latest version if it holds these files, or a new one; and whether it is new."""
    files = await asyncio.to_thread(model.hashed)
    latest = await asyncio.to_thread(registry.metadata.get, model.name, 0)
    if latest is not None and set(latest.files) == set(files):
        return latest, False
    header = UploadHeader(model.name, sha256=files[0].sha256, size_bytes=files[0].size_bytes, external_files=files[1:])
    try:
        return await registry.upload(header, _parts(model)), True
    except InvalidArgument as error:
        raise InvalidArgument(f"{model.files[MAIN_FILE]}: {error}") from None


async def register_folder(registry: ModelRegistry, folder: Path, model_name: str = "") -> list[ModelRecord]:
    """Register every model of `folder` (see find_models) not already stored with the same files."""
    records = []
    for model in find_models(folder, model_name):
        record, new = await register(registry, model)
        log.info(
            "model from folder registered" if new else "model from folder unchanged",
            extra={"model": record.name, "version": record.version, "path": str(model.files[MAIN_FILE])},
        )
        records.append(record)
    return records
