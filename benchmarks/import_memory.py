"""Host memory of a Hugging Face import, against the streaming rule (docs/interop.md).

    .venv/bin/python benchmarks/import_memory.py [--hf_dir DIR] [--mesh 8]

Without --hf_dir, transformers makes a 155M-param Llama (bf16, 311 MB; tests/hf_reference.py `large`) in a
temporary directory first. The import runs in this process in its two phases, `read_params` (every param
streamed shard by shard onto the mesh) and the orbax save, and the process's memory is read from
/proc/self/status after each: anonymous memory (what the import allocates) and file-backed memory (the
safetensors file's pages mapped by `safe_open`, page cache the kernel can drop). The rule: anonymous
growth <= the params this process owns (here all of them: 8 emulated devices on one host) + one tensor.
`--synthetic` places arrays of ones with the same shapes and shardings instead, to separate what JAX's
runtime costs for holding the params from what the reader adds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")


def memory_mb() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", default=None, help="a Hugging Face model directory (default: make the 155M Llama)")
    parser.add_argument("--mesh", default="fsdp=-1", help="the mesh params are placed on while reading")
    parser.add_argument("--synthetic", action="store_true", help="place arrays of ones of the same shapes and shardings instead of reading (JAX's own cost)")
    args = parser.parse_args()

    import jax
    import numpy as np

    from jaxbig.checkpoint import checkpoint_manager, save
    from jaxbig.checkpoint.run import abstract_params
    from jaxbig.config import MeshConfig
    from jaxbig.interop.hf import HFCheckpoint, read_params
    from jaxbig.parallel.mesh import make_mesh, parse_mesh_spec

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(args.hf_dir) if args.hf_dir else Path(tmp) / "hf"
        if not args.hf_dir:
            subprocess.run([str(REPO / ".venv-peers/bin/python"), str(REPO / "tests/hf_reference.py"), "large", str(hf_dir)], check=True, capture_output=True)
        mesh = make_mesh(MeshConfig(**parse_mesh_spec(args.mesh)), spec=args.mesh)
        start = memory_mb()
        ckpt = HFCheckpoint(hf_dir)
        cfg = ckpt.model_config()
        if args.synthetic:  # the same placement, shards made in memory: what JAX itself costs beside the params
            _, abstract = abstract_params(cfg, mesh)

            def ones(t):
                return jax.make_array_from_callback(
                    t.shape, t.sharding, lambda idx: np.ones([len(range(*s.indices(n))) for s, n in zip(idx, t.shape)], t.dtype)
                )

            params = jax.tree.map(ones, abstract)
        else:
            params = read_params(ckpt, cfg, mesh)
        jax.block_until_ready(params)
        read = memory_mb()
        manager = checkpoint_manager(Path(tmp) / "run", 1, track_best=False)
        save(manager, 0, {"params": params})
        manager.wait_until_finished()
        manager.close()
        saved = memory_mb()

        leaves = jax.tree.leaves(params)
        total = sum(x.nbytes for x in leaves) / 2**20
        largest = max(x.nbytes for x in leaves) / 2**20
        file_mb = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) / 2**20
        print(f"model: {cfg.num_params() / 1e6:.1f}M params, {file_mb:.0f} MiB of safetensors ({ckpt.source_dtype()}), mesh {dict(mesh.shape)}")
        print(f"params as placed (float32): {total:.0f} MiB; largest tensor {largest:.0f} MiB; rule: anonymous growth <= {total + largest:.0f} MiB")
        print("phase          RSS   anon   file  (MiB, /proc/self/status)")
        for name, m in (("start", start), ("after read", read), ("after save", saved)):
            print(f"{name:<12} {m['VmRSS']:6.0f} {m['RssAnon']:6.0f} {m['RssFile']:6.0f}")
        grow_read, grow_save = read["RssAnon"] - start["RssAnon"], saved["RssAnon"] - start["RssAnon"]
        print(f"anonymous growth: {grow_read:.0f} MiB after reading (= params + {grow_read - total:.0f}), {grow_save:.0f} MiB after the save; peak RSS {saved['VmHWM']:.0f} MiB")
        print(f"{'synthetic placement (no file read)' if args.synthetic else 'import'}: anonymous growth after reading {grow_read:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
