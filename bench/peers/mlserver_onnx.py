"""MLServer peer: a runtime running one ONNX file with onnxruntime (one intra-op thread).

MLServer imports it by its `implementation` (mlserver_onnx.OnnxRuntime) from the model folder
or PYTHONPATH; `parameters.uri` is the .onnx file. `predict_stream` serves ModelStreamInfer.
"""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(self.settings.parameters.uri, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        outputs = self.session.run(None, {i.name: NumpyCodec.decode_input(i) for i in payload.inputs})
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(n, y) for n, y in zip(self.output_names, outputs, strict=True)],
        )

    async def predict_stream(self, payloads):
        async for payload in payloads:
            yield await self.predict(payload)
