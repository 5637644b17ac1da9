"""The quantization engine: calibration data through the decoder one layer at a time, each module
handed to the method its scheme names (the looper names no method and no format)."""
