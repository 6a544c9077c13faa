"""jaxbig: a JAX-native framework for training and serving large models.

Import submodules directly (`jaxbig.config`, `jaxbig.train`, ...); this package imports
nothing heavy so that `jaxbig.runtime` can set up devices before jax loads.
"""

__version__ = "0.1.0"
