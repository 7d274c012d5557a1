"""MDS, the Model Deployment Service: stores ONNX models and serves predictions over gRPC."""
