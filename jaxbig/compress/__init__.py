"""Post-training weight compression for export: quantization rules over param paths."""

from jaxbig.compress.quantize import DYNAMIC_METHODS, METHODS, QuantRule, dequantize, dynamic_int8_einsum, llama_rules, quantize_params

__all__ = ["DYNAMIC_METHODS", "METHODS", "QuantRule", "dequantize", "dynamic_int8_einsum", "llama_rules", "quantize_params"]
