"""Executes the Colab notebooks top to bottom in a fresh kernel, so they cannot rot."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "colab" / "01_quickstart.ipynb"
KERNEL = "jaxbig-test"


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel on this interpreter, whatever kernelspecs the machine has installed."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": KERNEL, "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]))


def _kernel_env(**extra: str) -> dict[str, str]:
    """This process's environment without its CPU device count: the notebook must set up its own devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    # This checkout's jaxbig, ahead of any installed copy.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_quickstart_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(QUICKSTART, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook with its outputs cleared"
    # Appended to this in-memory copy only: which interpreter the kernel really ran on.
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)\nprint(sys.executable)", id="kernel-python"))
    run_dir = tmp_path / "run"
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=300, resources={"metadata": {"path": str(ROOT)}}  # cwd = the repository root
    )
    env = _kernel_env(JAXBIG_NB_STEPS="40", JAXBIG_NB_RUN_DIR=str(run_dir))
    client.execute(env=env, cleanup_kc=True)  # raises on the first failing cell; cleanup_kc shuts our kernel down
    cells = {c.get("id"): c for c in nb.cells}

    assert _stdout(cells["kernel-python"]).split() == [sys.prefix, sys.executable]
    assert "8 cpu devices" in _stdout(cells["devices"])
    assert "mesh {'data': 4, 'pipeline': 1, 'fsdp': 1, 'tensor': 2}" in _stdout(cells["train"])

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 40
    initial = json.loads((run_dir / "summary.json").read_text())["initial_eval_loss"]
    assert initial > 5.0, initial  # about ln 256 before training
    assert records[-1]["eval_loss"] < 4.0, records[-1]

    assert any("image/png" in o.get("data", {}) for o in cells["plot"].outputs), "the plot cell drew no figure"
    sample_text = _stdout(cells["sample"])
    assert "--- greedy" in sample_text and sample_text.count("--- sample") == 3, sample_text
    continuations = "".join(line for line in sample_text.splitlines() if not line.startswith("---")).replace("def ", "")
    assert len("".join(continuations.split())) > 30, sample_text  # 40 steps in, greedy may be all spaces; samples are not
