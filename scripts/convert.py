"""Convert between Hugging Face model directories and jaxbig runs.

    python scripts/convert.py --from hf PATH --run_dir runs/NAME [--mesh 8] [--param_dtype float32]
        A local Hugging Face directory (config.json, model.safetensors or sharded model-*.safetensors with
        their index, tokenizer.json) becomes a jaxbig run: config.yaml, an orbax checkpoint, the tokenizer.
        LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM; anything jaxbig cannot compute exactly
        is refused with the field that stops it (docs/interop.md).

    python scripts/convert.py --to hf --run_dir runs/NAME --out DIR [--step N] [--dtype bfloat16] [--max_shard_size 5GB]
        A jaxbig run (any mesh it trained on) becomes a directory that transformers'
        AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) load.

Fine-tune an imported model with `scripts/train.py --init_from runs/NAME --run_dir runs/NEW ...`
(or `--init_from hf:PATH` to import on the fly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from jaxbig.cli import fail  # noqa: E402
from jaxbig.config import ConfigError, MeshConfig  # noqa: E402
from jaxbig.runtime import emulate_cpu_devices  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "PATH"), help="import: hf PATH")
    way.add_argument("--to", dest="target", choices=["hf"], help="export a run to this format")
    parser.add_argument("--run_dir", required=True, help="the jaxbig run to write (import) or read (export)")
    parser.add_argument("--out", default=None, help="export: the directory to write")
    parser.add_argument("--mesh", default=None, help="import: the mesh the params are placed on while reading (default: fsdp over every device)")
    parser.add_argument("--param_dtype", default="float32", help="import: storage dtype of the params (float32 or bfloat16)")
    parser.add_argument("--step", type=int, default=None, help="export: checkpoint step (default: the latest)")
    parser.add_argument("--dtype", default=None, help="export: tensor dtype, float32, bfloat16 or float16 (default: the imported source's, else the params')")
    parser.add_argument("--max_shard_size", default="5GB", help="export: largest safetensors file; larger models are sharded with an index")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --run_dir (import) or --out (export)")
    args = parser.parse_args(argv)
    try:
        if args.source is not None:
            fmt, path = args.source
            if fmt != "hf":
                raise ConfigError(f"--from {fmt}: jaxbig imports hf (Hugging Face model directories)")
            if args.param_dtype not in ("float32", "bfloat16"):
                raise ConfigError(f"--param_dtype={args.param_dtype!r}: use float32 or bfloat16")
            emulate_cpu_devices(8)  # before JAX creates its devices
            from jaxbig.interop import import_hf
            from jaxbig.parallel.mesh import make_mesh, parse_mesh_spec

            mesh_cfg = MeshConfig(**parse_mesh_spec(args.mesh)) if args.mesh else MeshConfig(data=1, fsdp=-1)
            mesh = make_mesh(mesh_cfg, spec=args.mesh)
            cfg = import_hf(path, args.run_dir, mesh=mesh, param_dtype=args.param_dtype, overwrite=args.overwrite)
            m = cfg.model
            print(f"imported {path} -> {args.run_dir}: {m.num_params() / 1e6:.2f}M params, {m.num_layers} layers, vocab {m.vocab_size}")
        else:
            if not args.out:
                raise ConfigError("--to hf needs --out DIR, the directory to write")
            from jaxbig.interop import export_hf

            out = export_hf(args.run_dir, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
            print(f"exported {args.run_dir} -> {out}")
    except ConfigError as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
