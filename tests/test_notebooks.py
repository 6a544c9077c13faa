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
PARALLELISM = ROOT / "colab" / "02_parallelism.ipynb"
SERVING = ROOT / "colab" / "03_export_and_serve.ipynb"
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


def _text(cell) -> str:
    """stdout and the plain-text form of displayed objects (rich renders to a display in a kernel), ANSI colours removed."""
    parts = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream" and o.get("name") == "stdout":
            parts.append(o.get("text", ""))
        elif o.get("output_type") in ("display_data", "execute_result"):
            parts.append(o.get("data", {}).get("text/plain", ""))
    return re.sub(r"\x1b\[[0-9;]*m", "", "".join(parts))


def _has_png(cell) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


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


def test_parallelism_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(PARALLELISM, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook with its outputs cleared"
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300, resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=_kernel_env(), cleanup_kc=True)  # raises on the first failing cell
    cells = {c.get("id"): c for c in nb.cells}
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]

    assert "8 cpu devices" in _stdout(cells["devices"])
    meshes = _stdout(cells["meshes"])
    for line in (
        "4x2 -> mesh {'data': 4, 'pipeline': 1, 'fsdp': 1, 'tensor': 2}",
        "data=2,fsdp=2,tensor=2 -> mesh {'data': 2, 'pipeline': 1, 'fsdp': 2, 'tensor': 2}",
        "2x2x2 -> mesh {'data': 2, 'pipeline': 2, 'fsdp': 1, 'tensor': 2}",
    ):
        assert line in meshes, meshes
    assert re.search(r"^embed\s+fsdp$", _stdout(cells["rules"]), re.M), _stdout(cells["rules"])
    assert re.search(r"lm_head_DV\s+\(128, 256\)\s+P\('fsdp', 'tensor'\)\s+\(64, 128\)", _stdout(cells["layout"]))

    # visualize_array_sharding drew the blocks: on data=2,fsdp=2,tensor=2 each block sits on its two data replicas.
    drawn = _text(cells["visualize"])
    assert drawn.count("CPU 0,4") == 2 and drawn.count("CPU 3,7") == 2, drawn  # lm_head_DV and the MLP weight
    assert all(f"CPU {a},{a + 4}" in drawn for a in range(4)), drawn
    drawn = _text(cells["visualize-pipeline"])
    assert "CPU 0,1,4,5" in drawn and "CPU 2,3,6,7" in drawn, drawn  # the layer stack split over 2 stages

    # The bubble counted from the replayed schedule equals (p-1)/(v*m+p-1).
    bubbles = re.findall(
        r"(\w+) p=(\d+) m=(\d+) v=(\d+): (\d+) steps, idle (\d+) of (\d+) stage-steps = ([\d.]+); formula .* = ([\d.]+)$",
        _stdout(cells["schedule"]), re.M,
    )
    assert [(b[0], b[1], b[2], b[3]) for b in bubbles] == [("GPipe", "4", "8", "1"), ("circular", "4", "8", "2")], bubbles
    for _, p, m, v, steps, idle, total, counted, formula in bubbles:
        p, m, v = int(p), int(m), int(v)
        expected = (p - 1) / (v * m + p - 1)
        assert int(steps) == v * m + p - 1 and int(total) == p * int(steps)
        assert int(idle) / int(total) == pytest.approx(expected)
        assert float(counted) == pytest.approx(expected, abs=1e-4) and float(formula) == pytest.approx(expected, abs=1e-4)
    assert _has_png(cells["schedule"]), "the schedule cell drew no figure"

    # One row of collective bytes per layout: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, total.
    rows = {}
    for line in _stdout(cells["collectives"]).splitlines():
        fields = line.split()
        if len(fields) == 7 and "=" in fields[0]:
            rows[fields[0]] = [float(f.replace(",", "")) for f in fields[1:]]
    assert list(rows) == ["data=8", "fsdp=8", "data=4,tensor=2", "data=2,tensor=2,pipeline=2"], rows
    for layout, (reduce, gather, _, _, permute, total) in rows.items():
        assert reduce > 0 and total == pytest.approx(sum(rows[layout][:5]), abs=0.5), (layout, rows[layout])
        assert (gather > 0) == (layout == "fsdp=8"), (layout, rows[layout])  # weights gathered only under FSDP
        assert (permute > 0) == ("pipeline" in layout), (layout, rows[layout])  # stage to stage only with a pipeline
    assert _has_png(cells["collectives-plot"]), "the collectives cell drew no bar chart"


def test_serving_notebook_runs_top_to_bottom(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_serving")
    nb = nbformat.read(SERVING, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook with its outputs cleared"
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=600, resources={"metadata": {"path": str(ROOT)}})
    env = _kernel_env(JAXBIG_NB_STEPS="20", JAXBIG_NB_WORK_DIR=str(tmp_path / "work"), JAXBIG_NB_REPEATS="5", TF_CPP_MIN_LOG_LEVEL="2")
    client.execute(env=env, cleanup_kc=True)  # raises on the first failing cell
    cells = {c.get("id"): c for c in nb.cells}
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]

    assert "trained 20 steps on 8 cpu devices" in _stdout(cells["train"])
    ratio = float(re.search(r"int8 / float32 = ([\d.]+)", _stdout(cells["export"])).group(1))
    assert ratio < 0.35, _stdout(cells["export"])  # int8 weights: about 0.29x
    assert sorted(p.name for p in (tmp_path / "work" / "exports" / "tiny").iterdir()) == ["1", "2"]
    served = _stdout(cells["serve"])
    assert re.search(r"REST http://127\.0\.0\.1:\d+ +gRPC 127\.0\.0\.1:\d+", served), served
    assert '"version": "2"' in served and '"version": "1"' in served and served.count('"AVAILABLE"') == 2, served
    query = _stdout(cells["query"])
    assert "REST (columnar and row) and gRPC agree exactly for both versions; logits (1, 28, 256)" in query, query
    assert query.count("greedy:") == 2, query
    compare = _stdout(cells["compare"])
    for name in ("float32", "int8"):
        assert re.search(rf"{name} +size [\d.]+ MB  in-process [\d.]+ ms  gRPC [\d.]+ ms  REST [\d.]+ ms", compare), compare
    err, agree = re.search(r"max \|diff\| = ([\d.]+)% of max \|logit\|; argmax agrees at (\d+)%", compare).groups()
    assert float(err) < 5 and int(agree) >= 80, compare
    assert _has_png(cells["compare"]), "the compare cell drew no figure"
    onnx_out = _stdout(cells["onnx"])
    assert "files: ['decode_step.onnx', 'model.onnx']" in onnx_out, onnx_out
    diff, peak = map(float, re.search(r"over REST: max \|diff\| = (\S+) \(max \|logit\| (\S+)\)", onnx_out).groups())
    assert diff <= 1e-3 * peak, onnx_out  # two programs of the same float32 math (tests/test_onnx.py bounds them tightly)
    served_text, local_text = re.search(r"ONNX Runtime greedy: (.*)\nin this process, no server: (.*)", onnx_out).groups()
    assert served_text == local_text, onnx_out  # the server's generate is OnnxModel.generate on the same graph
    monitor = _stdout(cells["monitor"])
    before, after = map(float, re.search(r"PSI before the injection (\S+), at the end (\S+)", monitor).groups())
    assert before < 0.5 < after, monitor  # the alert rule's threshold (configs/monitoring/alerts.yml)
    val_nll, random_nll = map(float, re.search(r"validation text (\S+), random bytes (\S+)", monitor).groups())
    assert random_nll > val_nll + 1, monitor  # random bytes are out of domain: far less likely under the model
    assert _has_png(cells["monitor"]), "the monitoring cell drew no figure"
    assert "stopped" in _stdout(cells["stop"])
