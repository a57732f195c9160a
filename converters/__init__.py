"""edgeadapt.converters: Keras -> TFLite/ONNX export, quantization, bundle writing."""
