"""Serving exported models over TF Serving's REST and gRPC APIs (see docs/serving.md).

  server.py      EmbeddedServer: the TF-Serving-compatible server on the TF runtime (the default) or ONNX Runtime
  onnx_runtime.py  an export's ONNX graphs on ONNX Runtime (numpy + onnxruntime only), and their servable
  tf_serving.py  config files and the command line for a real `tensorflow_model_server`
  client.py      RestClient, GrpcClient, generate_text: clients that work against either
Submodules are imported explicitly; all of them but onnx_runtime's OnnxModel import TensorFlow or its protos when used.
"""
