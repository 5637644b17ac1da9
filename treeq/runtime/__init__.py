"""What runs a quantized model: quantizers of layer inputs (activations) and of the KV cache."""
