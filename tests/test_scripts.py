"""The scripts' contract: bad input gives one clear line and exit code 2, never a traceback from inside JAX."""

import os
import subprocess
import sys

import pytest


def _run(repo, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}  # the script sets up 8 devices itself
    return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mesh", "3x3"], "mesh 3x3 needs 9 devices, found 8"),
        (["--mesh", "data=3,tensor=-1"], "does not divide the 8 devices"),
        (["--set", "model.num_layer=3"], "did you mean model.num_layers?"),
        (["--set", "model.num_heads=3"], "model.num_heads=3 is not a multiple of model.num_kv_heads=4"),
        (["--mesh", "4x2", "--set", "train.batch_size=6"], "train.batch_size=6 is not divisible by data x fsdp = 4 x 1 = 4"),
        (["--mesh", "4x2", "--set", "mesh.data=2"], "mesh.data is set twice"),
        (["--mesh", "2x2x2", "--set", "model.num_layers=3"], "model.num_layers=3 is not divisible by pipeline stages x repeats = 2 x 1 = 2"),
        (["--config", "configs/huge.yaml"], "config file 'configs/huge.yaml' not found"),
        (["--set", "data.paths=/no/such/dir"], "data path '/no/such/dir' does not exist"),
        (["--set", "model.vocab_size=128"], "model.vocab_size=128 is smaller than the byte tokenizer's 256"),
    ],
)
def test_train_script_rejects_bad_input_clearly(repo, tmp_path, args, message):
    result = _run(repo, "scripts/train.py", "--run_dir", str(tmp_path / "run"), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_generate_script_rejects_a_missing_run(repo, tmp_path):
    result = _run(repo, "scripts/generate.py", "--run_dir", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "is not a jaxbig run directory" in result.stderr and "Traceback" not in result.stderr
