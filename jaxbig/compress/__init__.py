"""Post-training weight compression for export: quantization rules over param paths."""

from jaxbig.compress.quantize import METHODS, QuantRule, dequantize, llama_rules, quantize_params

__all__ = ["METHODS", "QuantRule", "dequantize", "llama_rules", "quantize_params"]
