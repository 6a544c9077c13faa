"""Model compression: post-training quantization rules over param paths (re-exported here);
pruning during training (`jaxbig.compress.prune`) and distillation (`jaxbig.compress.distill`),
imported by their module names."""

from jaxbig.compress.quantize import DYNAMIC_METHODS, METHODS, QuantRule, dequantize, dynamic_int8_einsum, llama_rules, quantize_params

__all__ = ["DYNAMIC_METHODS", "METHODS", "QuantRule", "dequantize", "dynamic_int8_einsum", "llama_rules", "quantize_params"]
