"""export: quantized ONNX out. Filled in by the export issue."""
