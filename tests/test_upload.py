"""UploadModel and model management over a real gRPC socket, against a real server process."""

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
import pytest

import onnx_models
from harness import ServerProcess, assert_status, upload, upload_requests, wait_until
from mds.v1 import model_service_pb2 as pb
from mds.v1 import tensor_pb2


def test_upload_records_signature_and_metadata(server, pretrained, unique):
    data = (pretrained / "magika.onnx").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    model = upload(
        server,
        unique,
        data,
        chunk_size=100_000,
        description="file types",
        labels={"team": "sec"},
        sha256=sha,
        size_bytes=len(data),
        metadata={"accuracy": 0.99, "tags": ["a", "b"]},
    )
    assert (model.name, model.version, model.sha256, model.size_bytes) == (unique, 1, sha, len(data))
    (spec,) = model.inputs
    assert (spec.name, spec.dtype, list(spec.shape)) == ("bytes", tensor_pb2.DATA_TYPE_INT32, [-1, 2048])
    assert [(o.name, o.dtype, list(o.shape)) for o in model.outputs] == [
        ("target_label", tensor_pb2.DATA_TYPE_FP32, [-1, 214])
    ]
    assert model.producer_name == "tf2onnx" and model.ir_version == 8
    assert ("ai.onnx.ml", 2) in [(o.domain, o.version) for o in model.opsets]
    assert model.description == "file types" and dict(model.labels) == {"team": "sec"}
    assert dict(model.metadata) == {"accuracy": 0.99, "tags": ["a", "b"]}
    assert [(f.path, f.sha256) for f in model.files] == [("model.onnx", sha)]
    assert model.created_at.seconds > 0
    assert server.models.GetModel(pb.GetModelRequest(name=unique)) == model
    assert server.models.GetModel(pb.GetModelRequest(name=unique, version=1)) == model


def test_versions_latest_list_and_delete(server, unique):
    for scale in (1.0, 2.0, 3.0):
        upload(server, unique, onnx_models.add_two(scale))
    assert server.models.GetModel(pb.GetModelRequest(name=unique)).version == 3
    pages, token = [], ""
    while True:
        page = server.models.ListModels(pb.ListModelsRequest(name=unique, page_size=2, page_token=token))
        pages.append([m.version for m in page.models])
        if not (token := page.next_page_token):
            break
    assert pages == [[1, 2], [3]]
    assert server.models.DeleteModel(pb.DeleteModelRequest(name=unique, version=2)).deleted_versions == [2]
    assert_status(
        lambda: server.models.GetModel(pb.GetModelRequest(name=unique, version=2)),
        grpc.StatusCode.NOT_FOUND,
        "version 2 does not exist",
    )
    assert server.models.DeleteModel(pb.DeleteModelRequest(name=unique)).deleted_versions == [1, 3]
    assert_status(lambda: server.models.GetModel(pb.GetModelRequest(name=unique)), grpc.StatusCode.NOT_FOUND)
    assert_status(lambda: server.models.DeleteModel(pb.DeleteModelRequest(name=unique)), grpc.StatusCode.NOT_FOUND)
    assert upload(server, unique, onnx_models.add_two()).version == 4  # never reused


def test_delete_removes_unshared_blobs_only(server, unique):
    data = onnx_models.add_two(7.0)
    sha = hashlib.sha256(data).hexdigest()
    upload(server, unique, data)
    upload(server, unique + "-twin", data)
    server.models.DeleteModel(pb.DeleteModelRequest(name=unique))
    assert sha in server.blobs()
    server.models.DeleteModel(pb.DeleteModelRequest(name=unique + "-twin"))
    assert sha not in server.blobs()


def test_malformed_page_token(server):
    assert_status(
        lambda: server.models.ListModels(pb.ListModelsRequest(page_token="garbage!")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )


def test_concurrent_uploads_of_one_name_get_distinct_versions(server, unique):
    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(lambda _: upload(server, unique, onnx_models.add_two()).version, range(12)))
    assert sorted(versions) == list(range(1, 13))


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize("name", ["", "Upper", "-lead", "a/b", "a" * 129, "spa ce", "..", "ünï"])
def test_bad_names(server, name):
    assert_status(
        lambda: upload(server, name, onnx_models.add_two()), grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"
    )


@pytest.mark.usefixtures("nothing_left")
def test_header_must_come_first(server):
    requests = iter([pb.UploadModelRequest(chunk=b"abc")])
    assert_status(
        lambda: server.models.UploadModel(requests),
        grpc.StatusCode.INVALID_ARGUMENT,
        "first UploadModelRequest must carry the header",
    )
    assert_status(lambda: server.models.UploadModel(iter([])), grpc.StatusCode.INVALID_ARGUMENT, "header")


@pytest.mark.usefixtures("nothing_left")
def test_second_header_is_rejected(server, unique):
    requests = [
        *upload_requests(unique, onnx_models.add_two()),
        pb.UploadModelRequest(header=pb.ModelHeader(name=unique)),
    ]
    assert_status(lambda: server.models.UploadModel(iter(requests)), grpc.StatusCode.INVALID_ARGUMENT, "only the first")


@pytest.mark.usefixtures("nothing_left")
def test_checksum_and_size_are_verified(server, unique):
    data = onnx_models.add_two()
    assert_status(
        lambda: upload(server, unique, data, sha256="0" * 64),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sha256 mismatch for 'model.onnx'",
    )
    assert_status(
        lambda: upload(server, unique, data, size_bytes=len(data) + 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"header says {len(data) + 1} bytes, received {len(data)}",
    )
    assert_status(
        lambda: upload(server, unique, data, sha256="xyz"), grpc.StatusCode.INVALID_ARGUMENT, "64 lowercase hex digits"
    )
    assert_status(lambda: server.models.GetModel(pb.GetModelRequest(name=unique)), grpc.StatusCode.NOT_FOUND)


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x00garbage bytes, not a model" * 100, "ONNX"),
        (onnx_models.add_two()[:-20], "ONNX"),
        (b"", "no bytes received"),
    ],
)
def test_unloadable_models_are_rejected(server, unique, data, reason):
    details = assert_status(lambda: upload(server, unique, data), grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert len(details) > 20
    assert_status(lambda: server.models.GetModel(pb.GetModelRequest(name=unique)), grpc.StatusCode.NOT_FOUND)


@pytest.mark.usefixtures("nothing_left")
def test_cancelled_upload_leaves_nothing(server, unique):
    resume = threading.Event()

    def requests():
        yield from upload_requests(unique, b"\x08" * 200_000, chunk_size=50_000)
        resume.wait(60)  # the client goes away before finishing the stream

    call = server.models.UploadModel.future(requests())
    wait_until(lambda: any(p.is_file() for p in server.leftovers()), what="the upload to reach the server")
    call.cancel()
    resume.set()
    wait_until(lambda: not server.leftovers(), what="the cancelled upload to be cleaned up")
    assert_status(lambda: server.models.GetModel(pb.GetModelRequest(name=unique)), grpc.StatusCode.NOT_FOUND)


def test_model_with_external_data(server, unique, tmp_path):
    path = onnx_models.save_with_external_data(tmp_path)
    side = (tmp_path / "model.onnx.data").read_bytes()
    model = upload(server, unique, path.read_bytes(), side_files={"model.onnx.data": side}, chunk_size=1000)
    assert [(f.path, f.size_bytes) for f in model.files] == [
        ("model.onnx", path.stat().st_size),
        ("model.onnx.data", len(side)),
    ]


@pytest.mark.usefixtures("nothing_left")
def test_external_data_errors(server, unique, tmp_path):
    path = onnx_models.save_with_external_data(tmp_path)
    data, side = path.read_bytes(), (tmp_path / "model.onnx.data").read_bytes()
    assert_status(
        lambda: upload(server, unique, data),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'model.onnx.data', which was not uploaded",
    )
    assert_status(
        lambda: upload(server, unique, data, side_files={"model.onnx.data": side}, external_files=[]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "undeclared file",
    )
    assert_status(
        lambda: upload(server, unique, data, side_files={"../model.onnx.data": side}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid file path",
    )
    assert_status(
        lambda: upload(server, unique, data, external_files=[pb.ModelFile(path="model.onnx.data")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no bytes received for file 'model.onnx.data'",
    )
    chunks = list(upload_requests(unique, data, side_files={"model.onnx.data": side}, chunk_size=100))
    interleaved = [chunks[0], chunks[-1], *chunks[1:]]  # a side-file chunk, then the main file resumes
    assert_status(
        lambda: server.models.UploadModel(iter(interleaved + [chunks[-1]])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must be contiguous",
    )


@pytest.mark.usefixtures("nothing_left")
@pytest.mark.parametrize("location", ["/etc/hostname", "../secret.bin", "sub/../../x", "./w"])
def test_external_data_outside_the_model_folder(server, unique, location):
    assert_status(
        lambda: upload(server, unique, onnx_models.pointing_outside(location)),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{location!r}, outside the model's folder",
    )


def test_size_limit_stops_the_upload(tmp_path, pretrained):
    small = ServerProcess(tmp_path, mds_max_model_bytes=1_000_000).start()
    try:
        data = (pretrained / "magika.onnx").read_bytes()
        assert_status(
            lambda: upload(small, "big", data, chunk_size=256_000),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "model size limit of 1000000 bytes",
        )
        wait_until(lambda: not small.leftovers(), what="the rejected upload to be cleaned up")
        assert small.blobs() == []
        assert list(small.models.ListModels(pb.ListModelsRequest()).models) == []
    finally:
        assert small.stop() == 0


def test_empty_chunks_are_harmless(server, unique):
    data = onnx_models.add_two(6.0)
    requests = list(upload_requests(unique, data, chunk_size=40))
    with_empties = [requests[0]] + [m for r in requests[1:] for m in (pb.UploadModelRequest(chunk=b""), r)]
    model = server.models.UploadModel(iter(with_empties))
    assert model.sha256 == hashlib.sha256(data).hexdigest() and model.size_bytes == len(data)
    assert hashlib.sha256(data).hexdigest() in server.blobs()


@pytest.mark.usefixtures("nothing_left")
def test_side_files_cannot_nest_in_one_another(server, unique):
    for paths in (["a", "a/b"], ["a/b/c", "a/b"], ["a/b", "a/b/c/d"], ["model.onnx/x"]):
        files = [pb.ModelFile(path=p) for p in paths]
        assert_status(
            partial(upload, server, unique, onnx_models.add_two(), external_files=files),
            grpc.StatusCode.INVALID_ARGUMENT,
            "is also used as a folder",
        )


@pytest.mark.usefixtures("nothing_left")
def test_side_files_past_the_limit_are_refused(server, unique):
    files = [pb.ModelFile(path=f"w/{i}.bin") for i in range(1001)]
    assert_status(
        partial(upload, server, unique, onnx_models.add_two(), external_files=files),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "at most 1000 side files (MDS_MAX_MODEL_FILES); 'w/1000.bin' would be one more",
    )


@pytest.mark.usefixtures("nothing_left")
def test_custom_op_domains_are_rejected(server, unique):
    details = assert_status(
        lambda: upload(server, unique, onnx_models.custom_op()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "onnxruntime cannot load the model",
    )
    assert "Exfiltrate" in details or "com.example.custom" in details
    assert_status(lambda: server.models.GetModel(pb.GetModelRequest(name=unique)), grpc.StatusCode.NOT_FOUND)
