"""jaxbig: a JAX-native framework for training and serving large models.

Import submodules directly (`jaxbig.config`, `jaxbig.train`, ...); this package imports
nothing heavy so that `jaxbig.runtime` can set up devices before jax loads.
"""

from jaxbig import runtime as _runtime

_runtime.tune_host_malloc()  # before jax's threads allocate: XLA:CPU's step buffers stay mapped (jaxbig.runtime)

__version__ = "0.1.0"
