"""The Python gRPC floor: a bare grpc.aio server with MDS's wire contract doing only decode -> run -> encode.

python bench/floor_server.py PORT MODEL.onnx
"""

import asyncio
import sys

import grpc
import numpy as np
import onnxruntime as ort

from mds.v1 import inference_service_pb2 as pb
from mds.v1 import inference_service_pb2_grpc, tensor_pb2


class Floor(inference_service_pb2_grpc.InferenceServiceServicer):
    def __init__(self, path: str):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name

    def _run(self, request: pb.PredictRequest) -> pb.PredictResponse:
        tensor = request.inputs[0]
        x = np.frombuffer(tensor.raw_data, dtype="<f4").reshape(tensor.shape)
        (y,) = self.session.run([self.output], {tensor.name: x})
        out = tensor_pb2.Tensor(name=self.output, dtype=tensor_pb2.DATA_TYPE_FP32, shape=y.shape, raw_data=y.tobytes())
        return pb.PredictResponse(model=request.model, version=1, outputs=[out], request_id=request.request_id)

    async def Predict(self, request, context):
        return self._run(request)

    async def PredictStream(self, request_iterator, context):
        async for request in request_iterator:
            yield pb.PredictStreamResponse(request_id=request.request_id, response=self._run(request))


async def main(port: int, path: str) -> None:
    server = grpc.aio.server()
    inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(Floor(path), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
