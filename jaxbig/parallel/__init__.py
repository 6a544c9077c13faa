"""Meshes, the logical -> mesh axis rules and the pipeline schedules (layer runners over a mesh axis). Models never import from here."""

from jaxbig.parallel.mesh import MESH_AXES, MeshError, check_fits, make_mesh, parse_mesh_spec, resolve_mesh_sizes
from jaxbig.parallel.pipeline import bubble_fraction, layer_runner
from jaxbig.parallel.rules import RULES, constrain, logical_to_spec, tree_shardings

__all__ = [
    "MESH_AXES",
    "MeshError",
    "RULES",
    "bubble_fraction",
    "check_fits",
    "constrain",
    "layer_runner",
    "logical_to_spec",
    "make_mesh",
    "parse_mesh_spec",
    "resolve_mesh_sizes",
    "tree_shardings",
]
