"""The model folder: its layout, config.json, safetensors weights checked against the model, the prior file,
resume state, metrics, the lock, and the ONNX graphs' metadata."""
