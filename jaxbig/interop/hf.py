"""Hugging Face model directories in and out: `import_hf` (a local directory -> a jaxbig run) and `export_hf`.

A Hugging Face directory is `config.json`, `model.safetensors` or sharded `model-0000i-of-0000N.safetensors`
with `model.safetensors.index.json`, `tokenizer.json` (+ `tokenizer_config.json`), `generation_config.json`.
An imported run directory holds:

    config.yaml              the jaxbig config (the model from config.json; everything else jaxbig's defaults)
    checkpoints/0/state      {"params": ...}, orbax, sharded as the target mesh placed it, with checksums.json
    tokenizer.json, ...      the model's tokenizer files, copied as they are
    hf_config.json           the source's config.json and generation_config.json, so an export keeps its
    hf_generation_config.json  architecture, token ids and fields jaxbig does not use
    imported.json            provenance: source directory, architecture, tensor count, dtype

Streaming: every param is built with `jax.make_array_from_callback` on its target sharding; each addressable
device's callback reads only that device's slice of the HF tensors (safetensors `get_slice` over a memory
map). Peak host memory is therefore one device shard of one param (plus the HF rows a transposed read spans)
on top of what the devices hold, never the whole model: the rule docs/interop.md applies to llama2_70b.

Everything is checked (architecture, config fields, every tensor's presence, shape and dtype, readable
headers, the tokenizer) before anything is written, and the run directory is written under a temporary name
and renamed when complete, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxbig.checkpoint import CONFIG_FILE, checkpoint_manager, load_params, load_run_config, save, write_checksums
from jaxbig.checkpoint.run import IMPORTED_FILE as IMPORTED
from jaxbig.checkpoint.run import abstract_params
from jaxbig.config import Config, DataConfig, ModelConfig, TrainConfig
from jaxbig.data import run_tokenizer
from jaxbig.data.tokenizer import HFTokenizer, to_hf
from jaxbig.interop.hf_config import InteropError, architecture_of, hf_config_for, model_config_from_hf, read_json
from jaxbig.interop.hf_weights import IGNORED_SUFFIXES, Entry, hf_names, hf_shape, layer_to_hf, param_map, read_slice
from jaxbig.models import Params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_CONFIG = "hf_config.json"
HF_GENERATION_CONFIG = "hf_generation_config.json"
DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors dtype -> numpy (ml_dtypes for bf16)


class HFCheckpoint:
    """A local Hugging Face model directory, opened lazily: headers read, no tensor data loaded."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise InteropError(f"{self.path} is not a directory; pass a Hugging Face model directory (config.json, *.safetensors)")
        self.config = read_json(self.path / "config.json")
        self.where = str(self.path / "config.json")
        self.architecture = architecture_of(self.config, self.where)
        self.weight_map = self._weight_map()
        self._files: dict[str, Any] = {}
        for file in sorted(set(self.weight_map.values())):
            try:
                self._files[file] = safe_open(self.path / file, framework="np")
            except (SafetensorError, OSError) as e:
                raise InteropError(f"{self.path / file} is not a readable safetensors file ({e}); re-download or re-save it") from None
        missing = [n for n, f in self.weight_map.items() if n not in self._files[f].keys()]
        if missing:
            raise InteropError(f"{INDEX_FILE} maps {missing[0]!r} to {self.weight_map[missing[0]]}, which does not hold it")

    def _weight_map(self) -> dict[str, str]:
        """tensor name -> file, from the index (sharded) or the single file's header."""
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InteropError(f"{index} has no weight_map; it is not a safetensors index")
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).is_file():
                    raise InteropError(f"{self.path / file} is missing: {INDEX_FILE} maps tensors to it (an incomplete download?)")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise InteropError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}; jaxbig reads safetensors weights only")
        try:
            with safe_open(single, framework="np") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise InteropError(f"{single} is not a readable safetensors file ({e}); re-download or re-save it") from None

    def tensor(self, name: str):
        """A `get_slice` handle: `[...]` reads only the requested bytes."""
        return self._files[self.weight_map[name]].get_slice(name)

    def dtype(self, name: str) -> str:
        return self.tensor(name).get_dtype()

    def model_config(self, param_dtype: str = "float32") -> ModelConfig:
        return model_config_from_hf(self.config, self.where, param_dtype=param_dtype)

    def check(self, cfg: ModelConfig) -> None:
        """Every tensor `cfg` needs is present with its shape and a float dtype; no tensor jaxbig would drop."""
        expected: dict[str, tuple[tuple[int, ...], Entry]] = {}
        _, abstract = abstract_params_on(cfg, None)
        for entry in param_map(cfg):
            shape = _leaf(abstract, entry.path).shape
            layer_shape = shape[1:] if entry.layered else shape
            for name in hf_names(entry, cfg.num_layers):
                expected[name] = (hf_shape(entry.kind, layer_shape), entry)
        for name, (want, _) in expected.items():
            if name not in self.weight_map:
                raise InteropError(f"{self.path}: tensor {name!r} is missing (config.json describes {cfg.num_layers} layers, tie_word_embeddings={cfg.tie_embeddings})")
            got = tuple(self.tensor(name).get_shape())
            if got != want:
                raise InteropError(f"{self.path / self.weight_map[name]}: tensor {name!r} has shape {list(got)}, config.json implies {list(want)}")
            if self.dtype(name) not in DTYPES:
                raise InteropError(f"{self.path / self.weight_map[name]}: tensor {name!r} has dtype {self.dtype(name)}; jaxbig reads {', '.join(DTYPES)}")
        tied_head = "lm_head.weight" if cfg.tie_embeddings else None  # transformers ties it to the embedding and ignores the file's
        extra = [n for n in self.weight_map if n not in expected and n != tied_head and not n.endswith(IGNORED_SUFFIXES)]
        if extra:
            raise InteropError(
                f"{self.path / self.weight_map[extra[0]]}: tensor {extra[0]!r} (and {len(extra) - 1} more) has no place in a "
                f"{self.architecture} as config.json describes it; jaxbig would drop it, so it refuses"
            )

    def source_dtype(self) -> str:
        """The weights' storage dtype (the embedding's), as transformers names it in config.json."""
        return DTYPES[self.dtype("model.embed_tokens.weight")]


def _leaf(tree: Params, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set_leaf(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def abstract_params_on(cfg: ModelConfig, mesh: Mesh | None) -> tuple[Any, Params]:
    """(graphdef, params as ShapeDtypeStructs) on `mesh`'s shardings by the rules (one device when None)."""
    if mesh is None:
        mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "pipeline", "fsdp", "tensor"))
    return abstract_params(cfg, mesh)


def read_params(ckpt: HFCheckpoint, cfg: ModelConfig, mesh: Mesh) -> Params:
    """The params, each placed shard by shard on its sharding on `mesh` (read lazily; see the module docstring)."""
    ckpt.check(cfg)
    _, abstract = abstract_params(cfg, mesh)
    params: dict = {}
    for entry in param_map(cfg):
        target = _leaf(abstract, entry.path)
        names = hf_names(entry, cfg.num_layers)
        dtype = np.dtype(target.dtype)

        def shard(index: tuple[slice, ...], entry=entry, names=names, target=target, dtype=dtype) -> np.ndarray:
            if not entry.layered:
                return read_slice(ckpt.tensor(names[0]), entry.kind, target.shape, index).astype(dtype)
            layers = range(*index[0].indices(target.shape[0]))
            per_layer = [read_slice(ckpt.tensor(names[l]), entry.kind, target.shape[1:], index[1:]).astype(dtype) for l in layers]
            return np.stack(per_layer)

        _set_leaf(params, entry.path, jax.make_array_from_callback(target.shape, target.sharding, shard))
    return params


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _commit_dir(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Renames the complete `tmp` to `dest`; with `overwrite`, the old `dest` is removed only after `tmp` is complete."""
    if dest.exists():
        if not overwrite:
            raise InteropError(f"{dest} appeared while writing; nothing was changed there")
        old = _tmp_sibling(dest)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
    else:
        tmp.rename(dest)


def _check_dest(dest: Path, overwrite: bool, flag: str) -> None:
    if dest.exists() and not overwrite and (not dest.is_dir() or any(dest.iterdir())):
        raise InteropError(f"{dest} already exists; choose another {flag} or pass --overwrite to replace it")


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """`path` holds a readable tokenizer.json whose ids the model can embed."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise InteropError(f"{file} not found: the model's tokenizer is missing; copy tokenizer.json into {path} (save_pretrained writes it)")
    try:
        tokenizer = HFTokenizer.load(path)
    except ValueError as e:
        raise InteropError(str(e)) from None
    if tokenizer.vocab_size > vocab_size:
        raise InteropError(f"{file} has {tokenizer.vocab_size} tokens but config.json's vocab_size is {vocab_size}; the model cannot embed them")


def import_hf(src: str | Path, run_dir: str | Path, *, mesh: Mesh, param_dtype: str = "float32", overwrite: bool = False) -> Config:
    """A Hugging Face model directory -> a jaxbig run directory (see the module docstring); returns the run's config."""
    src, run_dir = Path(src), Path(run_dir)
    ckpt = HFCheckpoint(src)
    model = ckpt.model_config(param_dtype)
    ckpt.check(model)
    check_tokenizer(src, model.vocab_size)
    _check_dest(run_dir, overwrite, "--run_dir")
    cfg = Config(
        model=model,
        data=DataConfig(seq_len=min(DataConfig().seq_len, model.max_seq_len)),
        train=TrainConfig(run_dir=str(run_dir)),
    )
    params = read_params(ckpt, model, mesh)

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(run_dir)
    try:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(cfg.to_yaml())
        manager = checkpoint_manager(tmp, keep=1, track_best=False)
        try:
            save(manager, 0, {"params": params})
            manager.wait_until_finished()
        finally:
            manager.close()
        write_checksums(tmp / "checkpoints" / "0")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        shutil.copyfile(src / "config.json", tmp / HF_CONFIG)
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", tmp / HF_GENERATION_CONFIG)
        provenance = {
            "source": str(src.resolve()),
            "architecture": ckpt.architecture,
            "tensors": len(ckpt.weight_map),
            "files": sorted(set(ckpt.weight_map.values())),
            "source_dtype": ckpt.source_dtype(),
            "param_dtype": param_dtype,
        }
        (tmp / IMPORTED).write_text(json.dumps(provenance, indent=1))
        _commit_dir(tmp, run_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return cfg


def _parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise InteropError(f"max_shard_size={text!r}: give bytes or a size like 5GB, 500MB")


def hf_tensors(cfg: ModelConfig, params: Params, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) for every param, one layer at a time, in `dtype`."""
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(jax.numpy.bfloat16)
    for entry in param_map(cfg):
        leaf = _leaf(params, entry.path)
        for l, name in enumerate(hf_names(entry, cfg.num_layers)):
            layer = np.asarray(jax.device_get(leaf[l] if entry.layered else leaf))
            yield name, layer_to_hf(entry.kind, layer.astype(np_dtype))


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def _imported_origin(run_dir: Path) -> Path | None:
    """The imported run directory `run_dir` is, or descends from through `train.init_from` (fine-tunes of fine-tunes)."""
    seen = set()
    while run_dir.resolve() not in seen:
        seen.add(run_dir.resolve())
        if (run_dir / IMPORTED).is_file() and (run_dir / HF_CONFIG).is_file():
            return run_dir
        parent = load_run_config(run_dir).train.init_from if (run_dir / CONFIG_FILE).is_file() else ""
        if not parent:
            return None
        run_dir = Path(parent)
    return None


def export_hf(
    run_dir: str | Path,
    out: str | Path,
    *,
    tokenizer_dir: Path | None = None,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
) -> Path:
    """A jaxbig run (any mesh it trained on; its latest checkpoint, or `step`) -> a directory transformers loads.

    `dtype` (float32, bfloat16, float16): the tensors' storage type; default the imported source's dtype, else the
    params'. Tensors are written in HF order, several files of at most `max_shard_size` with an index when they do
    not fit one. `tokenizer_dir` holds the tokenizer files to ship (default: the run directory's own, else the run's
    tokenizer converted to tokenizer.json: `jaxbig.data.tokenizer.to_hf`).
    """
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_run_config(run_dir)
    max_bytes = _parse_size(max_shard_size)
    origin = _imported_origin(run_dir)  # the imported run this one descends from by train.init_from, if any
    base = read_json(origin / HF_CONFIG) if origin is not None else None
    imported = read_json(origin / IMPORTED) if origin is not None else {}
    dtype = dtype or imported.get("source_dtype") or cfg.model.param_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InteropError(f"dtype={dtype!r}: use float32, bfloat16 or float16")
    hf_config = hf_config_for(cfg.model, base, dtype)
    tokenizer = None
    if tokenizer_dir is None and not (run_dir / "tokenizer.json").is_file():
        # A run jaxbig trained: its tokenizer (bytes, SentencePiece or a prepared set's tokenizer.json) as tokenizer.json
        try:
            tokenizer = to_hf(run_tokenizer(cfg, run_dir))
        except ValueError as e:  # a SentencePiece run: no exact tokenizer.json form
            raise InteropError(f"run_dir {str(run_dir)!r}: its tokenizer cannot be exported ({e}); pass tokenizer_dir") from None
        if base is None:
            hf_config.update({k: v for k, v in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)) if v is not None})
    else:
        tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else run_dir
        check_tokenizer(tokenizer_dir, cfg.model.vocab_size)
    _check_dest(out, overwrite, "--out")
    _, _, params, step = load_params(run_dir, step)

    itemsize = np.dtype(jax.numpy.bfloat16 if dtype == "bfloat16" else dtype).itemsize
    _, abstract = abstract_params_on(cfg.model, None)
    sizes = []
    for entry in param_map(cfg.model):
        shape = _leaf(abstract, entry.path).shape
        n = int(np.prod(shape[1:] if entry.layered else shape)) * itemsize
        sizes += [(name, n) for name in hf_names(entry, cfg.model.num_layers)]
    shards = _plan_shards(sizes, max_bytes)
    files = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    file_of = {name: files[i] for i, shard in enumerate(shards) for name in shard}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out)
    try:
        tmp.mkdir()
        pending: dict[str, dict[str, np.ndarray]] = {}
        remaining = {f: sum(1 for n in file_of.values() if n == f) for f in files}
        for name, tensor in hf_tensors(cfg.model, params, dtype):
            f = file_of[name]
            pending.setdefault(f, {})[name] = tensor
            if len(pending[f]) == remaining[f]:  # a file is written as soon as its tensors are ready, then dropped
                save_file(pending.pop(f), tmp / f, metadata={"format": "pt"})
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": dict(sorted(file_of.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        if origin is not None and (origin / HF_GENERATION_CONFIG).is_file():
            shutil.copyfile(origin / HF_GENERATION_CONFIG, tmp / "generation_config.json")
        else:
            gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config.get(k) is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, tmp / name)
        (tmp / "jaxbig_export.json").write_text(json.dumps({"run_dir": str(run_dir.resolve()), "step": step, "dtype": dtype}, indent=1))
        _commit_dir(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


__all__ = ["HFCheckpoint", "IMPORTED", "InteropError", "export_hf", "import_hf", "read_params"]
