"""Shipping a trained model: a safetensors folder for PyTorch, or ONNX for onnxruntime.

```
DIR/  (medseg export --format safetensors, or medseg.save_pretrained)
  model.safetensors   the weights: tensors only, so loading runs no code
  config.json         the resolved run config, with the format, medseg's version and the
                      source checkpoint's SHA-256
  README.md           the model card
DIR/  (medseg export --format onnx [--quantize int8 --calibration IMAGES])
  model.onnx          normalised float image (N, C, H, W) -> logits (N, K, H, W); int8 if quantized
  model-fp32.onnx     with --quantize int8: the float model it was quantized from
  medseg.json         what a runtime needs around the graph (size, mean/std, classes, threshold,
                      TTA) and the full config, from which medseg rebuilds its Predictor
  README.md
```

The package spans two layers, one module each way: `pretrained` and `onnx_runtime` read an
exported model and sit below `medseg.prediction.predictor`, whose Predictor runs both; `writer` turns a
checkpoint into one and sits above it (it resolves the recommended TTA and preprocesses
calibration images as the Predictor does). The package is not named ``export`` so that a
top-level ``medseg.export`` function (`medseg.api.export`) cannot shadow it.
"""
