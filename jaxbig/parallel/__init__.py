"""Meshes and the logical -> mesh axis rules. Models never import mesh axis names from here."""

from jaxbig.parallel.mesh import MESH_AXES, MeshError, make_mesh, parse_mesh_spec, resolve_mesh_sizes
from jaxbig.parallel.rules import RULES, constrain, logical_to_spec, tree_shardings

__all__ = [
    "MESH_AXES",
    "MeshError",
    "RULES",
    "constrain",
    "logical_to_spec",
    "make_mesh",
    "parse_mesh_spec",
    "resolve_mesh_sizes",
    "tree_shardings",
]
