"""Export: `jax.export` artifacts and a TF Serving SavedModel bridge (see docs/serving.md).

Submodules are imported explicitly (`jaxbig.export.bundle.export_run`): `reload` needs only
jax and numpy, `savedmodel` pulls in TensorFlow.
"""
