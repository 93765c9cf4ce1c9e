"""pipeline.core.config: validation messages name the dotted key, presets validate, helpers round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import (
    Config,
    ConfigError,
    build_config,
    deep_merge,
    flatten,
    load_config,
    read_yaml,
    unflatten,
)

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    return str(info.value)


# ---- bad values: each message names the key and says what is wrong --------------------------

BAD = [
    pytest.param({"train": {"lr_d": -1}}, "train.lr_d:", ["must be >", "got -1"], id="negative-lr_d"),
    pytest.param({"train": {"lr_g": 0}}, "train.lr_g:", ["must be >", "got 0"], id="zero-lr_g"),
    pytest.param({"bogus": 1}, "bogus:", ["unknown key"], id="unknown-top-level"),
    pytest.param({"train": {"bogus": 1}}, "train.bogus:", ["unknown key"], id="unknown-nested"),
    pytest.param({"train": {"ada": {"colour": 1}}}, "train.ada.colour:", ["unknown key"], id="unknown-deep"),
    pytest.param({"loss": {"name": "foo"}}, "loss.name:", ["must be one of", "wgan-gp", "'foo'"], id="bad-literal"),
    pytest.param({"model": {"d_norm": "group"}}, "model.d_norm:", ["must be one of", "'group'"], id="bad-d_norm"),
    pytest.param({"train": {"betas": [0.5, 1.0]}}, "train.betas:", ["[0, 1)", "1.0"], id="beta2-is-1"),
    pytest.param({"train": {"betas": [-0.1, 0.9]}}, "train.betas:", ["[0, 1)", "-0.1"], id="beta1-negative"),
    pytest.param(
        {"train": {"batch_size": 33, "num_workers": 2}},
        "train.batch_size:",
        ["divisible", "num_workers", "33"],
        id="batch-not-divisible",
    ),
    pytest.param({"data": {"name": "npz"}}, "data.path:", ["required", "npz"], id="npz-without-path"),
    pytest.param(
        {"data": {"name": "grid"}, "model": {"arch": "dcgan"}}, "model.arch:", ["mlp", "dcgan"], id="dcgan-2d"
    ),
    pytest.param(
        {"data": {"name": "digits"}, "model": {"arch": "mlp"}}, "model.arch:", ["dcgan", "mlp"], id="mlp-images"
    ),
    pytest.param(
        {"loss": {"name": "wgan-gp"}, "model": {"d_norm": "batch"}},
        "model.d_norm:",
        ["batch", "WGAN-GP"],
        id="batchnorm-wgan-gp",
    ),
    pytest.param({"model": {"arch": "mlp", "d_norm": "instance"}}, "model.d_norm:", ["instance"], id="instance-mlp"),
    pytest.param({"model": {"conditional": True}}, "model.conditional:", ["has no class labels"], id="conditional"),
    pytest.param({"train": {"ada": {"target": 1.5}}}, "train.ada.target:", ["must be < 1"], id="ada"),
    pytest.param({"data": {"val_fraction": 1.0}}, "data.val_fraction:", ["must be <", "1.0"], id="val_fraction-1"),
    pytest.param({"model": {"pack": 3}}, "model.pack:", ["divisible", "3"], id="pack-not-dividing"),
]


@pytest.mark.parametrize("raw, key, gist", BAD)
def test_bad_value_names_key_and_gist(raw, key, gist):
    msg = _error(raw)
    lines = msg.splitlines()
    assert len(lines) == 1, msg
    assert lines[0].startswith(key), msg
    for part in gist:
        assert part in msg, (part, msg)


def test_several_problems_one_line_each():
    msg = _error({"train": {"lr_d": -1, "lr_g": 0}, "loss": {"name": "x"}, "typo": 1})
    lines = msg.splitlines()
    assert len(lines) == 4, msg
    assert sorted(line.split(":")[0] for line in lines) == ["loss.name", "train.lr_d", "train.lr_g", "typo"]


def test_not_a_mapping():
    assert _error([1, 2]).startswith("params:")


def test_empty_and_none_give_defaults():
    assert build_config(None) == build_config({}) == Config()


def test_the_schema_defaults_are_params_yaml():
    # a key left out of params.yaml (or a partial params file) means what params.yaml says
    assert Config() == build_config(read_yaml(PARAMS))


def test_cross_checks_accept_good_combinations():
    # the refusals above are specific: the neighbouring good settings pass
    build_config({"loss": {"name": "wgan-gp"}, "model": {"d_norm": "layer"}})
    build_config({"data": {"name": "digits"}, "model": {"arch": "dcgan", "d_norm": "instance"}})
    build_config({"data": {"name": "npz", "path": "x.npz"}})
    build_config({"train": {"batch_size": 32, "num_workers": 2}, "model": {"pack": 4}})


# ---- params.yaml and presets -----------------------------------------------------------------


def test_params_yaml_validates():
    cfg = build_config(read_yaml(PARAMS))
    assert cfg == load_config(PARAMS)
    assert cfg.data.name == "grid" and cfg.model.arch == "mlp"


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"ring", "grid", "digits", "mnist5k"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_merged_into_params_validates(preset):
    base, part = read_yaml(PARAMS), read_yaml(preset)
    merged = deep_merge(base, part)
    cfg = build_config(merged)
    # the preset's values won, and keys it did not name kept params.yaml's values
    flat_cfg, flat_part, flat_base = cfg.flat(), flatten(part), flatten(base)
    for key, value in flat_part.items():
        assert flat_cfg[key] == value, key
    for key in set(flat_base) - set(flat_part):
        assert flat_cfg[key] == flat_base[key], key


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)


def test_load_config_overrides(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(PARAMS.read_text())
    cfg = load_config(p, {"train.lr_d": 0.5, "model.pack": 4})
    assert cfg.train.lr_d == 0.5 and cfg.model.pack == 4
    with pytest.raises(ConfigError, match=r"^train\.lr_d: must be >"):
        load_config(p, {"train.lr_d": -1})


# ---- helpers ---------------------------------------------------------------------------------


def test_deep_merge_is_nested_and_pure():
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}
    update = {"a": {"c": {"f": 3}}, "e": [2]}
    out = deep_merge(base, update)
    assert out == {"a": {"b": 1, "c": {"d": 2, "f": 3}}, "e": [2]}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}  # not mutated
    out["a"]["b"] = 99
    assert base["a"]["b"] == 1  # no shared sub-dicts


def test_flatten_unflatten_round_trip():
    d = build_config(read_yaml(PARAMS)).to_dict()
    flat = flatten(d)
    assert "train.ada.target" in flat and "train.lr_d" in flat
    # every section is flattened; tune.search_space (keyed by dotted params keys) stays one value
    assert all(not isinstance(v, dict) or v == {} or k == "tune.search_space" for k, v in flat.items())
    assert unflatten(flat) == d
    assert build_config(unflatten(flat)) == build_config(d)


def test_fingerprint_stable_and_sensitive():
    raw = read_yaml(PARAMS)
    a, b = build_config(raw), build_config(deep_merge(raw, {}))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint("model", "train") == b.fingerprint("train", "model")
    c = build_config(deep_merge(raw, {"train": {"lr_d": 0.002}}))
    assert c.fingerprint() != a.fingerprint()
    assert c.fingerprint("train") != a.fingerprint("train")
    assert c.fingerprint("model") == a.fingerprint("model")  # only the named sections count
    assert len(a.fingerprint()) == 12


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr_g: 0.001\n  steps: 10\n  lr_g: 0.002\n")
    with pytest.raises(ConfigError, match=r"lr_g: given twice \(line 4\)"):
        load_config(path)


def test_odd_params_files_are_named_in_one_line(tmp_path):
    """Non-UTF-8 bytes and a list used as a key were a bare codec error and a TypeError traceback;
    YAML's own errors ran over several lines."""
    path = tmp_path / "params.yaml"
    for content, message in [
        (b"train:\n  steps: \xff\n", r"params.yaml: not UTF-8 text \(byte 16"),
        (b"? [a]\n: 2\n", "params.yaml: line 1: a key must be a name, got a sequence"),
        (b"train:\n  steps: 10\n   lr: : 2\n", r"params.yaml: not valid YAML \(.*line 3"),
    ]:
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=message) as e:
            load_config(path)
        assert "\n" not in str(e.value)


def test_an_empty_params_file_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(path)


@pytest.mark.parametrize("root", ["s3:/bucket/x", "S3://bucket/x", "gs://bucket/x", "s3://", "http://host/x", "", "  "])
def test_storage_root_with_an_unknown_scheme_is_refused(root):
    assert _error({"storage": {"root": root}}).startswith("storage.root: ")


@pytest.mark.parametrize("root", [".ganpipe/ray", "/mnt/shared/ray", "s3://team/ray", "C:/ray"])
def test_storage_root_local_paths_and_s3_pass(root):
    assert build_config({"storage": {"root": root}}).storage.root == root


def test_a_search_space_is_replaced_whole_by_a_merge():
    base = {"tune": {"search_space": {"train.lr_g": {"loguniform": [0.0001, 0.01]}}, "num_samples": 8}}
    got = deep_merge(base, {"tune": {"search_space": {"train.lr_g": {"grid": [0.001, 0.002]}}}})
    assert got == {"tune": {"search_space": {"train.lr_g": {"grid": [0.001, 0.002]}}, "num_samples": 8}}


@pytest.mark.parametrize(
    "text,line",
    [
        ("model:\n  conditional: yes\n", "model.conditional: must be true or false, got 'yes'"),
        ("train:\n  ada:\n    enabled: on\n", "train.ada.enabled: must be true or false, got 'on'"),
        ("train:\n  steps: 1.0\n", "train.steps: must be an integer, got 1.0"),
        ("train:\n  steps: '400'\n", "train.steps: must be an integer, got '400'"),
        ("train:\n  lr_g: .nan\n", "train.lr_g: must be a finite number, got nan"),
        ("loss:\n  gp_weight: .inf\n", "loss.gp_weight: must be a finite number, got inf"),
        ("train:\n  betas: ['0.5', 0.999]\n", "train.betas.0: must be a number, got '0.5'"),
        ("train:\n  use_gpu: yes\n", "train.use_gpu: must be one of 'auto', True or False, got 'yes'"),
        ("seed: true\n", "seed: must be an integer, got True"),
    ],
)
def test_a_wrong_type_is_refused_never_coerced(tmp_path, text, line):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == line


def test_yaml_reads_numbers_and_booleans_as_dvc_does(tmp_path):
    """YAML 1.2, as DVC's ruamel.yaml: 1e-4 is a number (YAML 1.1 reads it as a string), `yes` a string."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr_g: 1e-4\n  lr_d: 2.5E-3\n  steps: 1_000\n  ada:\n    enabled: True\n")
    cfg = load_config(path)
    assert (cfg.train.lr_g, cfg.train.lr_d, cfg.train.steps, cfg.train.ada.enabled) == (1e-4, 2.5e-3, 1000, True)
    assert read_yaml(path)["train"]["lr_g"] == 1e-4
    path.write_text("tune:\n  search_space:\n    train.lr_g: {loguniform: [1e-4, 1e-2]}\n")
    assert read_yaml(path)["tune"]["search_space"]["train.lr_g"] == {"loguniform": [1e-4, 1e-2]}
