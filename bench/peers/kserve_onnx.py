"""KServe peer: a kserve.Model running one ONNX file with onnxruntime (one intra-op thread), V2 gRPC only.

$MDS_CACHE/peers/kserve/bin/python bench/peers/kserve_onnx.py GRPC_PORT HTTP_PORT NAME MODEL.onnx
"""

import logging
import sys

import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class OnnxModel(Model):
    def __init__(self, name: str, path: str):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        outputs = self.session.run(None, {i.name: i.as_numpy() for i in payload.inputs})
        infer_outputs = []
        for spec, y in zip(self.session.get_outputs(), outputs, strict=True):
            out = InferOutput(spec.name, list(y.shape), "FP32")
            out.set_data_from_numpy(y)
            infer_outputs.append(out)
        return InferResponse(
            response_id=payload.id,
            model_name=self.name,
            infer_outputs=infer_outputs,
            use_binary_outputs=payload.use_binary_outputs,
        )


if __name__ == "__main__":
    # KServe logs every gRPC call at INFO; a handler configured first keeps its defaults off.
    logging.basicConfig(level=logging.WARNING)
    grpc_port, http_port, name, path = sys.argv[1:5]
    ModelServer(
        grpc_port=int(grpc_port), http_port=int(http_port), enable_latency_logging=False, enable_docs_url=False
    ).start([OnnxModel(name, path)])
