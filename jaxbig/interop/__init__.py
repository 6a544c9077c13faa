"""Interoperability with other ecosystems' model formats.

`hf` (Hugging Face model directories in and out: `import_hf`, `export_hf`), built on `hf_config`
(config.json <-> ModelConfig, and what is refused) and `hf_weights` (tensor names, layouts and
slice reads). The reference for all of it is transformers itself (tests/test_interop.py).
"""

from jaxbig.interop.hf import HFCheckpoint, export_hf, import_hf, read_params
from jaxbig.interop.hf_config import InteropError, hf_config_for, model_config_from_hf

__all__ = ["HFCheckpoint", "InteropError", "export_hf", "hf_config_for", "import_hf", "model_config_from_hf", "read_params"]
