"""Predict and PredictStream against a real server: outputs equal in-process onnxruntime."""

import threading

import grpc
import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import json_format

import onnx_models
from harness import ONE, SAMPLES, assert_status, deploy, outputs_of, request, upload_requests
from mds.v1 import inference_service_pb2 as pb
from mds.v1 import tensor_pb2

RNG = np.random.default_rng(42)


def reference(model, feeds: dict) -> dict:
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model))
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def predict_both_ways(server, name, inputs, raw=True) -> list[dict]:
    """Outputs through Predict and through one PredictStream message."""
    unary = server.inference.Predict(request(name, inputs, raw, request_id="u"), timeout=60)
    (streamed,) = server.inference.PredictStream(iter([request(name, inputs, raw, request_id="s")]), timeout=60)
    assert streamed.request_id == "s" and streamed.WhichOneof("result") == "response"
    assert unary.request_id == "u"
    return [outputs_of(unary), outputs_of(streamed.response)]


def assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


PRETRAINED = {
    "magika.onnx": lambda: {"bytes": RNG.integers(0, 257, (3, 2048)).astype(np.int32)},
    "silero_vad.onnx": lambda: {
        "input": RNG.standard_normal((1, 512)).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    },
    "ppocr_det.onnx": lambda: {"x": RNG.random((1, 3, 64, 96)).astype(np.float32)},
    "ppocr_cls.onnx": lambda: {"x": RNG.random((2, 3, 48, 192)).astype(np.float32)},
}


@pytest.mark.parametrize("file", PRETRAINED)
@pytest.mark.parametrize("raw", [True, False])
def test_pretrained_models_match_onnxruntime(server, pretrained, unique, file, raw):
    deploy(server, unique, (pretrained / file).read_bytes())
    inputs = PRETRAINED[file]()
    want = reference(pretrained / file, inputs)
    for got in predict_both_ways(server, unique, inputs, raw):
        assert_same(got, want)


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("names", [[n for n in SAMPLES if n != "BF16"], [n for n in SAMPLES if n != "STRING"]])
def test_every_dtype_both_directions(server, unique, raw, names):
    deploy(server, unique, onnx_models.identity_all_dtypes(names))
    inputs = {f"x_{name}": SAMPLES[name] for name in names}
    for got in predict_both_ways(server, unique, inputs, raw):
        assert_same(got, {f"y_{name}": SAMPLES[name] for name in names})
    assert "BF16" not in names or got["y_BF16"].dtype == ml_dtypes.bfloat16


def test_strings_with_bf16_are_unimplemented(server, unique):
    deploy(server, unique, onnx_models.identity_all_dtypes())
    inputs = {f"x_{name}": array for name, array in SAMPLES.items()}
    assert_status(
        lambda: server.inference.Predict(request(unique, inputs)),
        grpc.StatusCode.UNIMPLEMENTED,
        "both STRING inputs and BF16 tensors",
    )


def test_output_encoding_follows_inputs_unless_asked(server, unique):
    deploy(server, unique, onnx_models.add_scalar())
    inputs = {"x": np.array([1, 2], np.float32), "s": np.array(0.5, np.float32)}
    raw = server.inference.Predict(request(unique, inputs, raw=True))
    typed = server.inference.Predict(request(unique, inputs, raw=False))
    forced = server.inference.Predict(
        request(unique, inputs, raw=True, output_encoding=tensor_pb2.TENSOR_ENCODING_CONTENTS)
    )
    assert raw.outputs[0].raw_data and not raw.outputs[0].contents.fp32_contents
    assert list(typed.outputs[0].contents.fp32_contents) == [1.5, 2.5] == list(forced.outputs[0].contents.fp32_contents)


@pytest.mark.parametrize("x", [np.array([], np.float32), np.array([1.0, -2.0], np.float32)])
def test_scalar_and_empty_tensors(server, unique, x):
    deploy(server, unique, onnx_models.add_scalar())
    inputs = {"x": x, "s": np.array(0.25, np.float32)}
    for got in predict_both_ways(server, unique, inputs):
        assert_same(got, {"y": x + np.float32(0.25)})


def test_string_inputs(server, unique):
    deploy(server, unique, onnx_models.string_labels())
    inputs = {"text": np.array(["dog", "émeu", "cat", "yak"], dtype=object)}
    for raw in (True, False):
        for got in predict_both_ways(server, unique, inputs, raw):
            assert_same(got, {"id": np.array([2, 3, 1, -1], np.int64)})


def test_half_precision(server, unique):
    deploy(server, unique, onnx_models.half_precision())
    h = RNG.standard_normal((2, 3)).astype(np.float16)
    for got in predict_both_ways(server, unique, {"h": h}):
        assert_same(got, {"same": h, "wide": h.astype(np.float32)})


def test_external_data_model_runs(server, unique, tmp_path):
    path = onnx_models.save_with_external_data(tmp_path)
    side = {"model.onnx.data": (tmp_path / "model.onnx.data").read_bytes()}
    server.models.UploadModel(upload_requests(unique, path.read_bytes(), side_files=side))
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    for got in predict_both_ways(server, unique, {"x": x}):
        assert_same(got, reference(path, {"x": x}))


def test_sklearn_classifier_zipmap_becomes_structured_output(server, unique):
    data = onnx_models.sklearn_classifier()
    deploy(server, unique, data)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    want = reference(data, {"X": x})
    response = server.inference.Predict(request(unique, {"X": x}))
    assert_same(outputs_of(response), {"output_label": want["output_label"]})
    probabilities = json_format.MessageToDict(response.structured_outputs["output_probability"])
    assert len(probabilities) == 3
    for got, expected in zip(probabilities, want["output_probability"], strict=True):
        assert got.keys() == {str(k) for k in expected}
        assert [got[str(k)] for k in expected] == pytest.approx([float(v) for v in expected.values()], rel=1e-6)


def test_output_names_filter(server, unique):
    deploy(server, unique, onnx_models.half_precision())
    h = np.ones((1, 3), np.float16)
    response = server.inference.Predict(request(unique, {"h": h}, output_names=["wide"]))
    assert [t.name for t in response.outputs] == ["wide"]
    assert_status(
        lambda: server.inference.Predict(request(unique, {"h": h}, output_names=["nope"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no output 'nope'",
        "['same', 'wide']",
    )


def test_versions_pinned_and_latest(server, unique):
    deploy(server, unique, onnx_models.add_two(1.0))
    deploy(server, unique, onnx_models.add_two(10.0))
    inputs = {"a": np.array([1.0], np.float32), "b": np.array([2.0], np.float32)}
    latest = server.inference.Predict(request(unique, inputs))
    pinned = server.inference.Predict(request(unique, inputs, version=1))
    assert (latest.version, outputs_of(latest)["z"].tolist()) == (2, [30.0])
    assert (pinned.version, outputs_of(pinned)["z"].tolist()) == (1, [3.0])


@pytest.fixture(scope="module")
def adder(server):
    deploy(server, "adder-for-errors", onnx_models.add_two())
    deploy(server, "fixed-shape", onnx_models.identity_all_dtypes(["FP32", "INT64"]))
    return "adder-for-errors"


@pytest.mark.parametrize(
    "inputs, fields, code, fragments",
    [
        (
            {"a": ONE, "b": ONE},
            {"model": "no-such-model"},
            grpc.StatusCode.NOT_FOUND,
            ["'no-such-model' does not exist"],
        ),
        ({"a": ONE, "b": ONE}, {"version": 99}, grpc.StatusCode.NOT_FOUND, ["version 99 does not exist"]),
        ({"a": ONE}, {}, grpc.StatusCode.INVALID_ARGUMENT, ["missing input 'b'"]),
        ({"a": ONE, "b": ONE, "c": ONE}, {}, grpc.StatusCode.INVALID_ARGUMENT, ["no input 'c'", "['a', 'b']"]),
        (
            {"a": ONE.astype(np.float64), "b": ONE},
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["input 'a' must have dtype FP32, got FP64"],
        ),
        (
            {"a": np.ones((1, 1), np.float32), "b": ONE},
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["input 'a' must have shape [?], got [1, 1]"],
        ),
        (
            {"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)},
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            ["onnxruntime could not run model 'adder-for-errors'"],
        ),
    ],
)
def test_request_errors(server, adder, inputs, fields, code, fragments):
    fields = dict(fields)  # parameters are shared between the two server configurations
    call = request(fields.pop("model", adder), inputs, **fields)
    assert_status(lambda: server.inference.Predict(call), code, *fragments)
    (reply,) = server.inference.PredictStream(iter([call]))
    assert reply.error.code == code.value[0] and all(f in reply.error.message for f in fragments)


def test_fixed_dimension_is_checked(server, adder):
    inputs = {"x_INT64": SAMPLES["INT64"], "x_FP32": np.ones((2, 3), np.float32)}
    assert_status(
        lambda: server.inference.Predict(request("fixed-shape", inputs)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'x_FP32' must have shape [?, 2], got [2, 3]",
    )


def test_duplicate_input_and_bad_tensor(server, adder):
    duplicated = request(adder, {"a": ONE, "b": ONE})
    duplicated.inputs.append(duplicated.inputs[0])
    assert_status(lambda: server.inference.Predict(duplicated), grpc.StatusCode.INVALID_ARGUMENT, "'a' is given twice")
    bad = pb.PredictRequest(
        model=adder,
        inputs=[tensor_pb2.Tensor(name="a", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[10**12], raw_data=b"1234")],
    )
    assert_status(lambda: server.inference.Predict(bad), grpc.StatusCode.INVALID_ARGUMENT, "needs 4000000000000 bytes")


def test_stream_keeps_order_and_survives_a_bad_message(server, adder):
    def make(i):
        if i == 5:
            return request(adder, {"a": ONE}, request_id="bad")
        return request(adder, {"a": np.array([i], np.float32), "b": ONE}, request_id=f"r{i}")

    replies = list(server.inference.PredictStream(iter([make(i) for i in range(20)]), timeout=60))
    assert [r.request_id for r in replies] == ["bad" if i == 5 else f"r{i}" for i in range(20)]
    assert replies[5].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "missing input 'b'" in replies[5].error.message
    for i, reply in enumerate(replies):
        if i != 5:
            assert outputs_of(reply.response)["z"].tolist() == [i + 1.0]


def test_stream_answers_each_request_while_the_client_keeps_sending(server, adder):
    """A client that waits for each reply before sending the next one (no deadlock, no batching needed)."""
    sent, replies = threading.Semaphore(0), []

    def requests():
        for i in range(5):
            yield request(adder, {"a": np.array([i], np.float32), "b": ONE}, request_id=str(i))
            sent.acquire()

    for reply in server.inference.PredictStream(requests(), timeout=60):
        replies.append(outputs_of(reply.response)["z"].tolist())
        sent.release()
    assert replies == [[i + 1.0] for i in range(5)]
