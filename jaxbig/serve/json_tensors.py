"""TF Serving's REST JSON <-> named numpy arrays, following tensorflow_serving/util/json_tensor.cc.

Request bodies: `{"signature_name"?: str, "instances": [...]}` (row format: one element per batch
row, a list of objects when the signature has several inputs) or `{"inputs": value | {name: value}}`
(columnar format). Values take the dtype the signature declares for that input; the checks and
their messages are json_tensor.cc's (a float where int32 is expected is "JSON Value: 1.5 Type:
Number is not of expected type: int32"). Responses: `{"predictions": [...]}` for row requests,
`{"outputs": ...}` for columnar ones; with one output tensor its name is dropped.
Written here rather than borrowed: TF Serving's converter is C++ and no Python package carries it.

Nesting: Python's json parser and the converters below recurse once per level, so a body of
100,000 '[' would end in RecursionError inside the handler. `parse_json` first measures the
body's nesting depth without recursion (`nesting_depth`) and refuses anything deeper than the
signature's rank plus the JSON envelope (`depth_limit`) before the parser runs.
"""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import orjson
import numpy as np

from jaxbig.serve.errors import ServingError, invalid_argument

ROW, COLUMNAR = "row", "columnar"
_INT_RANGES = {"int8": 32, "int16": 32, "uint8": 32, "int32": 32, "int64": 64, "uint32": 32, "uint64": 64}


def _debug(value: Any) -> str:
    # rapidjson's compact Writer, as JsonValueToDebugString prints the offending value.
    return json.dumps(value, separators=(",", ":"), allow_nan=True)


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    return {dict: "Object", list: "Array", str: "String"}.get(type(value), "Number")


def _type_error(value: Any, dtype: str) -> ServingError:
    return invalid_argument(f"JSON Value: {_debug(value)} Type: {_json_type(value)} is not of expected type: {dtype}")


def _check_value(value: Any, dtype: str) -> Any:
    """AddValueToTensor: is this JSON scalar acceptable for `dtype`?"""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if dtype in ("float32", "float64", "float16", "bfloat16"):
        if not is_number:
            raise _type_error(value, dtype)
    elif dtype in _INT_RANGES:
        signed = not dtype.startswith("uint")
        bits = _INT_RANGES[dtype]
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
            raise _type_error(value, dtype)
    elif dtype == "bool":
        if not isinstance(value, bool):
            raise _type_error(value, dtype)
    else:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, f"Conversion of JSON Value: {_debug(value)} to type: {dtype}")
    return value


def _shape(value: Any) -> list[int]:
    """GetDenseTensorShape: follow the first element down."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value: Any, level: int, shape: list[int], dtype: str, flat: list) -> None:
    """FillTensorProto: every leaf at depth rank, every list at its level's size."""
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise invalid_argument(f"JSON Value: {_debug(value)} found at incorrect level: {level + 1} in the JSON DOM. Expected at level: {rank}")
        if isinstance(value, dict):
            raise _type_error(value, dtype)
        flat.append(_check_value(value, dtype))
        return
    if level >= rank:
        raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise invalid_argument(f"Encountered list at unexpected size: {len(value)} at level: {level} expected size: {shape[level]}")
    for v in value:
        _fill(v, level + 1, shape, dtype, flat)


def to_array(value: Any, dtype: str) -> np.ndarray:
    shape = _shape(value)
    flat: list = []
    _fill(value, 0, shape, dtype, flat)
    return np.array(flat, dtype=np.dtype(dtype) if dtype != "bfloat16" else np.float32).reshape(shape)


# The levels a valid request adds around a tensor of the signature's rank: the request object,
# 'inputs' as an object of named inputs or 'instances' as a list of objects, and a {"b64": ...} leaf
# ({"instances": [...]} puts the batch dimension itself in the list, so it adds 1 level, not 2).
ENVELOPE_DEPTH = 3
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string with its escapes
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEP = np.zeros(256, np.int32)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


def depth_limit(max_rank: int) -> int:
    """The deepest nesting a request for inputs of rank <= max_rank can need."""
    return max_rank + ENVELOPE_DEPTH


def nesting_depth(body: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, outside its strings; no recursion (C-speed passes)."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    return int(np.cumsum(_STEP[np.frombuffer(brackets, np.uint8)], dtype=np.int32).max())


def parse_json(body: bytes, max_depth: int) -> dict:
    """The request body as a JSON object; anything unparsable, or nested deeper than max_depth, is InvalidArgument."""
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    depth = nesting_depth(body)
    if depth > max_depth:
        raise invalid_argument(
            f"JSON Parse error: arrays and objects nest {depth} levels deep; this model's signatures need at most {max_depth} "
            f"(the inputs' rank + {ENVELOPE_DEPTH} for the request object, 'inputs'/'instances' and b64 objects)"
        )
    try:
        doc = json.loads(body)  # accepts NaN and Infinity, as TF Serving's kParseNanAndInfFlag does
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and int() refusing more than 4300 digits
        raise invalid_argument(f"JSON Parse error: {getattr(e, 'msg', e)} at offset: {getattr(e, 'pos', 0)}") from None
    if not isinstance(doc, dict):
        raise invalid_argument(f"JSON Value: {_debug(doc)} Is not object")
    return doc


def signature_name(doc: dict) -> str:
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid_argument(f"JSON Value: {_debug(doc)} not formatted correctly. 'signature_name' key must be a string value.")
    return name


def parse_predict(doc: dict, input_dtypes: dict[str, str]) -> tuple[dict[str, np.ndarray], str]:
    """FillPredictRequestFromJson: (named arrays, ROW or COLUMNAR) given the signature's input dtypes."""
    if not input_dtypes:
        raise invalid_argument("Failed to get input map for signature: " + (doc.get("signature_name") or "DEFAULT"))
    if "instances" in doc:
        if "inputs" in doc:
            raise invalid_argument(f"JSON Value: {_debug(doc)} Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist ")
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise invalid_argument(f"JSON Value: {_debug(doc)} Expecting 'instances' to be an list/array")
        if not instances:
            raise invalid_argument(f"JSON Value: {_debug(doc)} No values in 'instances' array")
        return _from_instances(instances, input_dtypes), ROW
    if "inputs" in doc:
        return _from_inputs(doc["inputs"], input_dtypes), COLUMNAR
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _is_object(value: Any) -> bool:
    return isinstance(value, dict) and not (len(value) == 1 and isinstance(value.get("b64"), str))


def _from_instances(instances: list, dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    if not isinstance(instances[0], dict) and len(dtypes) > 1:
        raise invalid_argument("instances is a plain list, but expecting list of objects as multiple input tensors required as per tensorinfo_map")
    objects = _is_object(instances[0])
    rows: dict[str, list[np.ndarray]] = {name: [] for name in dtypes} if objects else {next(iter(dtypes)): []}
    for i, item in enumerate(instances):
        if objects != _is_object(item):
            raise invalid_argument(f"Expecting {'object but got list' if objects else 'value/list but got object'} at item {i} of input list")
        named = item if objects else {next(iter(dtypes)): item}
        for name, value in named.items():
            if name not in dtypes:
                error = invalid_argument(f"JSON object: does not have named input: {name}")
            else:
                try:
                    arr = to_array(value, dtypes[name])
                    error = None
                    if rows[name] and arr.shape != rows[name][0].shape:
                        first = rows[name][0]
                        error = invalid_argument(
                            f"Expecting tensor size: {first.size} but got: {arr.size}" if arr.size != first.size else f"Expecting shape {list(first.shape)} but got: {list(arr.shape)}"
                        )
                except ServingError as e:
                    error = e
            if error is not None:
                where = f"{i} key: {name}" if objects else f"{i}"
                raise invalid_argument(f"Failed to process element: {where} of 'instances' list. Error: {error.code.name}: {error.message}")
            rows[name].append(arr)
        if objects and set(item) != set(dtypes):
            raise invalid_argument(f"Failed to process element: {i} of 'instances' list. JSON object: {_debug(item)} keys must be equal to: {','.join(sorted(dtypes))}")
    return {name: np.stack(arrs) for name, arrs in rows.items()}


def _from_inputs(value: Any, dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    if not _is_object(value):
        if len(dtypes) > 1:
            raise invalid_argument("inputs is a plain value/list, but expecting an object as multiple input tensors required as per tensorinfo_map")
        name = next(iter(dtypes))
        return {name: to_array(value, dtypes[name])}
    out = {}
    for name, dtype in dtypes.items():
        if name not in value:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        out[name] = to_array(value[name], dtype)
    return out


# numpy dtypes orjson writes itself (OPT_SERIALIZE_NUMPY): float32 as its shortest round-trip decimal, the same float32
# that TF Serving's WriteDecimal text (StrCat's 6 digits, or max_digits10 where those do not round-trip) parses to.
_ORJSON_KINDS = "fiub"


def _orjson_ready(outputs: dict[str, np.ndarray]) -> bool:
    """Whether orjson can write these outputs as TF Serving would: numeric dtypes it knows, and no NaN or Infinity
    (orjson writes those as null; TF Serving writes them bare, so those responses take the `json` path)."""
    for arr in outputs.values():
        if arr.dtype.kind not in _ORJSON_KINDS or arr.dtype.itemsize > 8:
            return False
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return False
    return True


def _json_ready(arr: np.ndarray) -> Any:
    # float32 -> Python float is exact, so a client parsing the text back to float32 gets the same bits.
    return arr.tolist()


def format_predict(outputs: dict[str, np.ndarray], fmt: str) -> bytes:
    """MakeJsonFromTensors: the response body for a row or columnar request.

    orjson writes numpy arrays directly (a [1, 32, 256] float32 response without 8,192 Python floats from `tolist`);
    outputs it cannot write as TF Serving does (NaN, Infinity, other dtypes) go through `json` as before.
    """
    if not outputs:
        raise invalid_argument("Cannot convert empty tensor map to JSON")
    fast = _orjson_ready(outputs)
    ready = (lambda a: np.ascontiguousarray(a)) if fast else _json_ready
    if fmt == COLUMNAR:
        body: Any = {"outputs": ready(next(iter(outputs.values())))} if len(outputs) == 1 else {"outputs": {k: ready(v) for k, v in outputs.items()}}
    else:
        batch = None
        for name, arr in outputs.items():
            if arr.ndim == 0:
                raise invalid_argument(f"Tensor name: {name} has no shape information ")
            if batch is not None and arr.shape[0] != batch:
                raise invalid_argument(f"Tensor name: {name} has inconsistent batch size: {arr.shape[0]} expecting: {batch}")
            batch = arr.shape[0]
        if len(outputs) == 1:
            predictions = ready(next(iter(outputs.values())))
        else:
            lists = {k: ready(v) for k, v in outputs.items()}
            predictions = [{k: lists[k][i] for k in outputs} for i in range(batch)]
        body = {"predictions": predictions}
    if fast:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    # NaN and Infinity are written bare, as TF Serving's writer does (Python's json does the same).
    return json.dumps(body, separators=(",", ":")).encode()
