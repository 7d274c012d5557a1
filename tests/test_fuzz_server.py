"""Hypothesis against live servers: any upload framing and any request gets OK or a client-error status.

Never UNKNOWN or INTERNAL, a rejected upload leaves no model, staged file or blob, and the servers
still report SERVING at the end. Examples are derandomized, so every run (and CI) tries the same cases.
"""

import hashlib
import math
import re
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import onnx_models
from harness import ServerProcess, assert_status, upload_requests
from mds.oip import grpc_service_pb2 as oip_pb
from mds.oip import grpc_service_pb2_grpc
from mds.v1 import inference_service_pb2 as ipb
from mds.v1 import job_service_pb2 as jpb
from mds.v1 import model_service_pb2 as pb
from mds.v1 import tensor_pb2
from mds_grpc.api.tensors import CONTENTS_FIELD
from mds_grpc.core import dtypes

CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
}
CODES = {code.value[0]: code for code in grpc.StatusCode}


def fuzz(examples: int):
    return settings(
        max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )


def outcome(call):
    """`call()`'s reply, or None when it failed with a client-error status that says why.

    Each status is a hypothesis event: `--hypothesis-show-statistics` shows how deep the cases reached.
    """
    try:
        reply = call()
    except grpc.RpcError as error:
        assert error.code() in CLIENT_ERRORS, (error.code(), error.details())
        assert error.details() and not error.details().startswith("Stream removed"), error.details()
        event(error.code().name)
        return None
    event("OK")
    return reply


def assert_stream_reply(code: grpc.StatusCode | None, message: str = ""):
    """A stream's reply to one message: a response (code None) or a client-error status that says why."""
    if code is not None:
        assert code in CLIENT_ERRORS and message, (code, message)
    event(code.name if code else "OK")


BITS = st.integers(0, 2**48 - 1)


class Bits:
    """One drawn integer read three bits at a time: far fewer draws (so far faster examples) than a draw per choice.

    A field of 7 (one time in eight; hypothesis favours small integers, the plain cases) makes that part odd.
    """

    def __init__(self, draw):
        self.value = draw(BITS)

    def __getitem__(self, at: int) -> int:
        return (self.value >> (3 * at)) & 7

    def odd(self, at: int) -> bool:
        return self[at] == 7


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """Starts embedded servers for this module; each must still be SERVING when the fuzzing is over."""
    started = []

    def start(name: str) -> ServerProcess:
        started.append(ServerProcess(tmp_path_factory.mktemp(name)).start())
        return started[-1]

    yield start
    for server in started:
        health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert server.stop() == 0


# ---- upload framing ----------------------------------------------------------------------------------------


def _external_model() -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        path = onnx_models.save_with_external_data(Path(folder))
        return path.read_bytes(), (path.parent / "model.onnx.data").read_bytes()


PLAIN = onnx_models.add_two(5.0)
EXTERNAL_MAIN, EXTERNAL_SIDE = _external_model()
PAYLOADS = {
    "plain": (PLAIN, {}),
    "external": (EXTERNAL_MAIN, {"model.onnx.data": EXTERNAL_SIDE}),
    "truncated": (PLAIN[:-25], {}),
    "garbage": (b"\x08\x07garbage" * 9, {}),
    "empty": (b"", {}),
}
NAMES = st.sampled_from(
    ["fuzz-model", "f.z_9", "", "Upper", "-lead", "a/b", "..", "ünï", "a" * 129, "abc\n", "x" * 20_000]
) | st.text(max_size=8)
PATHS = st.sampled_from(
    [
        "model.onnx.data",
        "model.onnx",
        "w.bin",
        "a",
        "a/b",
        "../x",
        "/etc/passwd",
        "",
        ".",
        "a//b",
        "x\n",
        "d" * 256,
        "/".join(["d" * 200] * 6),
        "p" * 20_000,
    ]
) | st.text(max_size=6)
METADATA = st.sampled_from([{}, {"tags": ["a", {"b": None}]}, {"bad": float("nan")}, {"bad": float("-inf")}])
MODEL_FILES = st.lists(
    st.builds(
        pb.ModelFile,
        path=PATHS,
        size_bytes=st.sampled_from([0, 1, -1, len(EXTERNAL_SIDE)]),
        sha256=st.sampled_from(["", "0" * 64, "nothex"]),
    ),
    max_size=3,
)
STRAY_PARTS = st.one_of(
    st.builds(lambda name: pb.UploadModelRequest(header=pb.ModelHeader(name=name)), NAMES),
    st.builds(lambda data: pb.UploadModelRequest(chunk=data), st.binary(max_size=32)),
    st.builds(
        lambda path, data: pb.UploadModelRequest(file_chunk=pb.FileChunk(path=path, data=data)),
        PATHS,
        st.binary(max_size=32),
    ),
    st.just(pb.UploadModelRequest()),
)
PAYLOAD_KINDS = st.sampled_from(sorted(PAYLOADS))
LABELS = st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["drop", "repeat", "swap", "cut", "insert"]), st.integers(0, 10**6), st.integers(0, 10**6)
    ),
    max_size=3,
)


@st.composite
def upload_streams(draw) -> list[pb.UploadModelRequest]:
    """A well-formed upload of a real, truncated or garbage model, with a header that may lie, then mutated."""
    main, side_files = PAYLOADS[draw(PAYLOAD_KINDS)]
    bits = Bits(draw)
    header = {
        "sha256": ("", hashlib.sha256(main).hexdigest(), "0" * 64, "xyz")[bits[0] % 4 if bits.odd(1) else 0],
        "size_bytes": (0, len(main), len(main) + 1, -1)[bits[2] % 4 if bits.odd(3) else bits[2] % 2],
        "metadata": draw(METADATA) if bits.odd(4) else {"accuracy": 0.9},
        "labels": draw(LABELS),
    }
    if bits.odd(5):
        header["external_files"] = draw(MODEL_FILES)
    name = draw(NAMES) if bits.odd(6) else "fuzz-model"
    stream = list(upload_requests(name, main, (65536, 300, 16)[bits[7] % 3], side_files=side_files, **header))
    for kind, index, other in draw(MUTATIONS):
        i, j = index % (len(stream) + 1), other % (len(stream) + 1)
        if kind == "insert":
            stream.insert(i, draw(STRAY_PARTS))
        elif kind == "cut":
            del stream[i:]
        elif i < len(stream) and kind == "drop":
            del stream[i]
        elif i < len(stream) and kind == "repeat":
            stream.insert(i, stream[i])
        elif max(i, j) < len(stream):
            stream[i], stream[j] = stream[j], stream[i]
    return stream


@pytest.fixture(scope="module")
def uploads_server(serving):
    return serving("fuzz-uploads")


@fuzz(1000)
@given(stream=upload_streams() | st.lists(STRAY_PARTS, max_size=6))
def test_fuzzed_upload_streams(uploads_server, stream):
    """A published model is well named and listed (then deleted); a rejected one leaves nothing anywhere."""
    server = uploads_server
    model = outcome(lambda: server.models.UploadModel(iter(stream), timeout=60))
    if model is not None:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,127}", model.name)
        assert server.models.GetModel(pb.GetModelRequest(name=model.name, version=model.version)) == model
        server.models.DeleteModel(pb.DeleteModelRequest(name=model.name))
    assert list(server.models.ListModels(pb.ListModelsRequest()).models) == []
    assert server.leftovers() == []
    assert server.blobs() == []


@pytest.mark.parametrize(
    "name, header, files, fragment",
    [
        ("abc\n", {}, {}, "invalid model name 'abc\\n'"),
        ("x" * 20_000, {}, {}, "invalid model name 'xxxx"),
        ("ok", {"sha256": "f" * 20_000}, {}, "must be 64 lowercase hex digits"),
        ("ok", {}, {"d" * 256: b"w"}, "invalid file path 'dddd"),
        ("ok", {}, {"/".join(["d" * 200] * 6): b"w"}, "at most 1024 characters"),
        ("ok", {"external_files": [pb.ModelFile(path="a\n")]}, {}, "invalid file path 'a\\n'"),
        ("ok", {"metadata": {"accuracy": float("nan")}}, {}, "header.metadata must be JSON"),
    ],
    ids=["newline-name", "huge-name", "huge-sha256", "long-component", "long-path", "newline-path", "nan-metadata"],
)
def test_upload_headers_found_by_fuzzing(uploads_server, name, header, files, fragment):
    """Each was INTERNAL, accepted, or a status too big to reach the client; now a short INVALID_ARGUMENT."""
    requests = upload_requests(name, PLAIN, side_files=files, **header)
    details = assert_status(
        lambda: uploads_server.models.UploadModel(requests, timeout=60), grpc.StatusCode.INVALID_ARGUMENT, fragment
    )
    assert len(details) < 1000
    assert uploads_server.leftovers() == [] and uploads_server.blobs() == []


def test_chunk_for_a_huge_undeclared_path(uploads_server):
    stray = pb.UploadModelRequest(file_chunk=pb.FileChunk(path="p" * 20_000, data=b"x"))
    stream = [*upload_requests("ok", PLAIN), stray]
    details = assert_status(
        lambda: uploads_server.models.UploadModel(iter(stream), timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk for undeclared file 'pppp",
    )
    assert len(details) < 1000


# ---- request validation ------------------------------------------------------------------------------------

# Deployed model -> ({input: (dtype, shape with None for symbolic dimensions)}, outputs).
SIGNATURES = {
    "adder": ({"a": ("FP32", [None]), "b": ("FP32", [None])}, ["z"]),
    "labels": ({"text": ("STRING", [None])}, ["id"]),
    "reshape": ({"x": ("FP32", [None, 2])}, ["y"]),
    "scalar": ({"x": ("FP32", [None]), "s": ("FP32", [])}, ["y"]),
    "dense": ({"x": ("FP32", [None, 2])}, ["scores", "label"]),
    "mixed": (
        {f"x_{n}": (n, [None, 2]) for n in ("BOOL", "INT8", "UINT64", "FP16", "BF16", "STRING")},
        [f"y_{n}" for n in ("BOOL", "INT8", "UINT64", "FP16", "BF16", "STRING")],
    ),
}
MODELS = {
    "adder": onnx_models.add_two(),
    "labels": onnx_models.string_labels(),
    "reshape": onnx_models.fails_unless_rows_divide_by_four(),
    "scalar": onnx_models.add_scalar(),
    "dense": onnx_models.dense(features=2),
    "mixed": onnx_models.identity_all_dtypes(["BOOL", "INT8", "UINT64", "FP16", "BF16", "STRING"]),
}
MODEL_NAMES = st.sampled_from([*SIGNATURES, *SIGNATURES, "nope", "", "Upper", "a/b"])
INPUT_NAMES = {model: st.sampled_from([*signature, "", "junk"]) for model, (signature, _) in SIGNATURES.items()}
OUTPUT_NAMES = {
    model: st.sampled_from([[], [], [], outputs[:1], outputs[::-1], ["nope"], [""], outputs[:1] * 2])
    for model, (_, outputs) in SIGNATURES.items()
}
DTYPE_NAMES = [name.removeprefix("DATA_TYPE_") for name in tensor_pb2.DataType.keys()]
DTYPES = st.sampled_from([*DTYPE_NAMES, "99"])
ODD_SHAPES = st.lists(st.sampled_from([0, 1, 2, 3, -1, 10**12, 2**62]), max_size=4) | st.just([1] * 17)
FIELDS = st.sampled_from(sorted(CONTENTS_FIELD.values()))
FILL = {
    "bool_contents": True,
    "int_contents": 1,
    "int64_contents": -1,
    "uint_contents": 1,
    "uint64_contents": 2**64 - 1,
    "fp32_contents": 1.5,
    "fp64_contents": -0.5,
    "bytes_contents": "é".encode(),
}
ODD_VALUES = {
    field: st.lists(values, min_size=1, max_size=3)
    for field, values in {
        "bool_contents": st.booleans(),
        "int_contents": st.integers(-(2**31), 2**31 - 1),
        "int64_contents": st.integers(-(2**63), 2**63 - 1),
        "uint_contents": st.integers(0, 2**32 - 1),
        "uint64_contents": st.integers(0, 2**64 - 1),
        "fp32_contents": st.floats(width=32),
        "fp64_contents": st.floats(),
        "bytes_contents": st.binary(max_size=4),
    }.items()
}
ODD_RAW = st.binary(min_size=1, max_size=8)


@st.composite
def tensors(draw, names: st.SearchStrategy, signature: dict, name: str | None = None) -> tensor_pb2.Tensor:
    """Mostly the model's dtype and shape with as many values as the shape needs; one part in eight is off.

    Values are constants (decoding any value has its own fuzz test in test_tensor_codec.py).
    """
    bits = Bits(draw)
    name = draw(names) if name is None else name
    dtype, template = signature.get(name, ("FP32", [None]))
    dtype = draw(DTYPES) if bits.odd(0) else dtype
    shape = (
        draw(ODD_SHAPES) if bits.odd(1) else [(bits[6 + i] + 1) % 4 if d is None else d for i, d in enumerate(template)]
    )
    count = bits[2] % 4 if bits.odd(3) else math.prod(shape) if all(0 <= d <= 3 for d in shape) else 1
    tensor = tensor_pb2.Tensor(
        name=name, shape=shape, dtype=99 if dtype == "99" else tensor_pb2.DataType.Value("DATA_TYPE_" + dtype)
    )
    natural = "contents" if dtype == "STRING" or dtype in CONTENTS_FIELD and bits[4] < 4 else "raw"
    form = ("raw", "contents", "both", "neither")[bits[5] % 4] if bits.odd(9) else natural
    if form in ("raw", "both"):
        itemsize = dtypes.BY_NAME[dtype].numpy.itemsize if dtype in dtypes.BY_NAME else 4
        tensor.raw_data = draw(ODD_RAW) if bits.odd(10) else b"\x01" * count * itemsize
    if form in ("contents", "both"):
        field = CONTENTS_FIELD.get(dtype) or draw(FIELDS)
        getattr(tensor.contents, field).extend(draw(ODD_VALUES[field]) if bits.odd(11) else [FILL[field]] * count)
    return tensor


@st.composite
def predict_requests(draw) -> ipb.PredictRequest:
    """Every input of some model (or a few inputs of any name), for a deployed model or not."""
    bits = Bits(draw)
    model = draw(MODEL_NAMES)
    known = model if model in SIGNATURES else "adder"
    signature = SIGNATURES[known][0]
    if not bits.odd(0):
        inputs = [draw(tensors(INPUT_NAMES[known], signature, name)) for name in signature]
    else:
        inputs = draw(st.lists(tensors(INPUT_NAMES[known], signature), max_size=4))
    return ipb.PredictRequest(
        model=model,
        version=(0, 0, 0, 0, 1, 2, -1, 2**63 - 1)[bits[1]],
        inputs=inputs,
        output_names=draw(OUTPUT_NAMES[known]),
        request_id=f"r{bits.value}",
        output_encoding=bits[3] % 5 - 1 if bits.odd(4) else 0,
    )


@pytest.fixture(scope="module")
def requests_server(serving):
    server = serving("fuzz-requests")
    for name, data in MODELS.items():
        server.models.UploadModel(upload_requests(name, data), timeout=60)
    return server


@fuzz(2000)
@given(request=predict_requests())
def test_fuzzed_predict(requests_server, request):
    reply = outcome(lambda: requests_server.inference.Predict(request, timeout=60))
    if reply is not None:
        assert reply.model == request.model and reply.request_id == request.request_id
        assert {t.name for t in reply.outputs} | set(reply.structured_outputs) <= set(SIGNATURES[request.model][1])


@fuzz(700)
@given(requests=st.lists(predict_requests(), min_size=2, max_size=8))
def test_fuzzed_predict_stream(requests_server, requests):
    """One reply per message, in order, each a response or a client-error status; the stream itself ends OK."""
    replies = list(requests_server.inference.PredictStream(iter(requests), timeout=60))
    assert [r.request_id for r in replies] == [r.request_id for r in requests]
    for reply in replies:
        assert reply.HasField("error") or reply.HasField("response")
        assert_stream_reply(CODES[reply.error.code] if reply.HasField("error") else None, reply.error.message)


V2_DATATYPES = st.sampled_from(["BYTES", *DTYPE_NAMES, "", "fp32", "INT128"])
V2_VERSIONS = st.sampled_from(["", "", "1", "2", "0", "-1", "x", " 1", "01", "1.0"])
ODD_RAW_ENTRY = st.binary(max_size=8)


@st.composite
def infer_requests(draw) -> oip_pb.ModelInferRequest:
    """mds.v1 tensors restated in V2 terms: typed contents, or raw_input_contents (sometimes miscounted)."""
    request = draw(predict_requests())
    infer = oip_pb.ModelInferRequest(
        model_name=request.model,
        id=request.request_id,
        model_version=draw(V2_VERSIONS),
        outputs=[oip_pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in request.output_names],
    )
    bits = Bits(draw)
    raw_only = all(t.raw_data or t.dtype == tensor_pb2.DATA_TYPE_STRING for t in request.inputs)
    typed_only = not any(t.raw_data for t in request.inputs)
    raw = raw_only if raw_only != typed_only else bits[0] < 4
    for i, tensor in enumerate(request.inputs):
        core = (
            tensor_pb2.DataType.Name(tensor.dtype).removeprefix("DATA_TYPE_")
            if tensor.dtype in (tensor_pb2.DataType.values())
            else "99"
        )
        datatype = draw(V2_DATATYPES) if bits.odd(2 + i % 14) else {"STRING": "BYTES"}.get(core, core)
        added = infer.inputs.add(name=tensor.name, shape=tensor.shape, datatype=datatype)
        if raw:
            infer.raw_input_contents.append(
                tensor.raw_data or b"".join(len(v).to_bytes(4, "little") + v for v in tensor.contents.bytes_contents)
            )
        else:
            added.contents.ParseFromString(tensor.contents.SerializeToString())
    if raw and bits.odd(1):
        infer.raw_input_contents.append(draw(ODD_RAW_ENTRY))
    return infer


@pytest.fixture(scope="module")
def v2(requests_server):
    return grpc_service_pb2_grpc.GRPCInferenceServiceStub(requests_server.channel)


@fuzz(1500)
@given(request=infer_requests())
def test_fuzzed_v2_model_infer(v2, request):
    reply = outcome(lambda: v2.ModelInfer(request, timeout=60))
    if reply is not None:
        assert reply.model_name == request.model_name and reply.id == request.id


@fuzz(600)
@given(requests=st.lists(infer_requests(), min_size=2, max_size=8))
def test_fuzzed_v2_stream(v2, requests):
    replies = list(v2.ModelStreamInfer(iter(requests), timeout=60))
    assert [r.infer_response.id for r in replies] == [r.id for r in requests]
    for reply in replies:
        name, _, message = reply.error_message.partition(": ")
        assert_stream_reply(grpc.StatusCode[name] if name else None, message)


@st.composite
def job_requests(draw) -> jpb.CreateJobRequest:
    """Inline rows for a model, or an input id (unknown or none), and batch sizes in and out of range."""
    request, bits = draw(predict_requests()), Bits(draw)
    return jpb.CreateJobRequest(
        model=request.model,
        version=request.version,
        inputs=[] if bits.odd(0) else request.inputs,
        input_id=("nope", "../x")[bits[1] % 2] if bits.odd(2) else "",
        output_names=request.output_names,
        batch_rows=(0, 0, 1, 3, 0, 4096, -1, 2**63 - 1)[bits[3]],
    )


@fuzz(1200)
@given(request=job_requests())
def test_fuzzed_job_creation(requests_server, request):
    """An accepted job is QUEUED over the rows of its inline inputs (an unknown input id never gets that far)."""
    job = outcome(lambda: requests_server.jobs.CreateJob(request, timeout=60))
    if job is not None:
        rows = request.inputs[0].shape[0]
        assert (job.model, job.state, job.rows_total) == (request.model, jpb.JOB_STATE_QUEUED, rows)
        assert job.batch_rows == (request.batch_rows or job.batch_rows) > 0


# ---- requests the fuzzing once turned into INTERNAL or "Stream removed" ----------------------------------------


@pytest.mark.parametrize("version", ["²", "٣", "9" * 25])
def test_v2_version_strings(v2, version):
    assert_status(
        lambda: v2.ModelInfer(oip_pb.ModelInferRequest(model_name="adder", model_version=version), timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version must be empty (the latest), a version number or an alias",
    )


@pytest.mark.parametrize("name", ["m" * 20_000, "€" * 5_000], ids=["ascii", "non-ascii"])
def test_predict_with_a_huge_model_name(requests_server, name):
    details = assert_status(
        lambda: requests_server.inference.Predict(ipb.PredictRequest(model=name), timeout=60), grpc.StatusCode.NOT_FOUND
    )
    assert details.endswith("characters in all)") and len(details) < 2100
