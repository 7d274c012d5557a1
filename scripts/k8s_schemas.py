"""Kubernetes' JSON schemas, from the kubernetes-validate package, laid out for `kubeconform -schema-location`.

`python scripts/k8s_schemas.py [VERSION]` prepares them once under $MDS_CACHE and prints the folder to pass:
kubeconform reads FOLDER/v<VERSION>-standalone-strict/<kind>-<group>-<version>.json. The package's schemas point
at https://kubernetes.io/api/_definitions.json; the copies point at the local file instead, so nothing is fetched.
"""

import argparse
import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path

from local_machine import CACHE

ROOT = CACHE / "kubernetes-json-schema"
PACKAGE_REF = '"$ref": "/api/_definitions.json'


def schema_root(version: str) -> Path:
    """The folder to give kubeconform for Kubernetes VERSION (e.g. 1.35.0); its schemas are written on first use."""
    folder = ROOT / f"v{version}-standalone-strict"
    if (folder / "_definitions.json").is_file():
        return ROOT
    source = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    if not source.is_dir():
        raise SystemExit(f"error: kubernetes-validate has no schemas for Kubernetes {version}")
    ROOT.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=ROOT, prefix=f".v{version}-"))
    local_ref = f'"$ref": "{(folder / "_definitions.json").as_uri()}'
    for schema in source.iterdir():
        (staging / schema.name).write_text(schema.read_text().replace(PACKAGE_REF, local_ref))
    try:
        os.rename(staging, folder)  # all at once: a reader never sees half a folder
    except OSError:  # another process got there first
        shutil.rmtree(staging)
    return ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", nargs="?", default="1.35.0", help="Kubernetes version (default: %(default)s)")
    print(schema_root(parser.parse_args().version))


if __name__ == "__main__":
    main()
