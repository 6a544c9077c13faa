"""Configs: presets load with published shapes; overrides are typed; bad values fail with the fix named."""

import pytest

from jaxbig.config import ConfigError, load_config, parse_override
from jaxbig.parallel.mesh import MeshError, parse_mesh_spec, resolve_mesh_sizes
from jaxbig.config import MeshConfig

PRESETS = ["tiny", "small", "llama_125m", "llama2_7b", "llama3_8b", "llama2_70b"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(repo, name):
    cfg = load_config(repo / "configs" / f"{name}.yaml")
    assert cfg.model.num_params() > 0


@pytest.mark.parametrize(
    "name, billions",
    [("llama2_7b", 6.738), ("llama3_8b", 8.030), ("llama2_70b", 68.977)],
)
def test_real_sizes_match_published_param_counts(repo, name, billions):
    cfg = load_config(repo / "configs" / f"{name}.yaml")
    assert cfg.model.num_params() / 1e9 == pytest.approx(billions, abs=1e-3)


def test_tiny_preset_equals_defaults(repo):
    assert load_config(repo / "configs" / "tiny.yaml") == load_config(None)


def test_overrides_are_typed():
    cfg = load_config(None, ["model.num_layers=8", "optim.learning_rate=1e-3", "model.tie_embeddings=true", "data.paths=a.txt,b"])
    assert cfg.model.num_layers == 8
    assert cfg.optim.learning_rate == 1e-3
    assert cfg.model.tie_embeddings is True
    assert cfg.data.paths == ("a.txt", "b")
    assert load_config(None, ["optim.learning_rate=1"]).optim.learning_rate == 1.0  # int -> float is fine


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_layer=8"], "unknown config key 'model.num_layer'; did you mean model.num_layers?"),
        (["modle.num_layers=8"], "unknown config key 'modle'"),
        (["model.num_layers=eight"], "model.num_layers='eight' has type str, expected int"),
        (["model.num_layers=8.5"], "model.num_layers=8.5 has type float, expected int"),
        (["model.tie_embeddings=3"], "model.tie_embeddings=3 has type int, expected bool"),
        (["model.num_layers=2", "model.num_layers=3"], "model.num_layers is set twice"),
        (["model.num_layers"], "must look like section.key=value"),
        (["model=3"], "model is a section"),
        (["model.num_heads=6", "model.num_kv_heads=4"], "model.num_heads=6 is not a multiple of model.num_kv_heads=4"),
        (["data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=256"),
        (["optim.warmup_steps=50", "train.steps=10"], "optim.warmup_steps=50 exceeds train.steps=10"),
        (["model.dtype=float16"], "model.dtype='float16': use auto, float32 or bfloat16"),
        (["model.num_layers=0"], "model.num_layers=0 must be positive"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "only one axis may be -1"),
        (["model.head_dim=33"], "model.head_dim=33 must be even"),
        (["parallel.schedule=1f1b"], "parallel.schedule='1f1b': use gpipe or circular"),
        (["parallel.repeats=2"], "parallel.repeats=2 needs parallel.schedule=circular"),
    ],
)
def test_bad_overrides_name_the_value_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_missing_config_file_lists_presets():
    with pytest.raises(ConfigError, match="not found; presets: .*tiny.yaml"):
        load_config("configs/nope.yaml")


def test_override_values_parse_as_yaml():
    assert parse_override("train.run_dir=runs/x") == ("train.run_dir", "runs/x")
    assert load_config(None, ["optim.learning_rate=3e-4"]).optim.learning_rate == 3e-4  # YAML 1.1 reads 3e-4 as a string


@pytest.mark.parametrize(
    "spec, sizes",
    [
        ("4x2", {"data": 4, "pipeline": 1, "fsdp": 1, "tensor": 2}),
        ("8", {"data": 8, "pipeline": 1, "fsdp": 1, "tensor": 1}),
        ("2x2x2", {"data": 2, "pipeline": 2, "fsdp": 1, "tensor": 2}),
        ("data=2,fsdp=2,tensor=2", {"data": 2, "pipeline": 1, "fsdp": 2, "tensor": 2}),
        ("fsdp=-1,tensor=2", {"data": 1, "pipeline": 1, "fsdp": -1, "tensor": 2}),
    ],
)
def test_parse_mesh_spec(spec, sizes):
    assert parse_mesh_spec(spec) == sizes


@pytest.mark.parametrize(
    "spec, message",
    [
        ("3x3", "mesh 3x3 needs 9 devices, found 8"),
        ("data=16", "mesh data=16 needs 16 devices, found 8"),
        ("data=3,fsdp=-1", "the other axes use 3 devices, which does not divide the 8 devices"),
    ],
)
def test_mesh_that_does_not_fit_the_devices(spec, message):
    with pytest.raises(MeshError) as e:
        resolve_mesh_sizes(MeshConfig(**parse_mesh_spec(spec)), 8, spec)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("pipe=2", "unknown axis 'pipe'; axes are data, pipeline, fsdp, tensor"),
        ("2x2x2x2", "at most 3"),
        ("4xa", "use DATAxTENSOR"),
        ("data=0", "mesh.data=0: axis sizes are positive integers or -1"),
    ],
)
def test_bad_mesh_specs(spec, message):
    with pytest.raises(MeshError) as e:
        parse_mesh_spec(spec)
    assert message in str(e.value)


def test_fill_axis_takes_the_rest():
    assert resolve_mesh_sizes(MeshConfig(data=-1, tensor=2), 8) == {"data": 4, "pipeline": 1, "fsdp": 1, "tensor": 2}
