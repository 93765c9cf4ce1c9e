"""The run identity: which params and which code make a run, kept equal to what DVC tracks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core import identity
from pipeline.core.config import build_config, deep_merge, read_yaml, unflatten

ROOT = Path(__file__).resolve().parents[2]
PARAMS = read_yaml(ROOT / "params.yaml")


def stage(dvc_file: str, name: str) -> dict:
    return yaml.safe_load((ROOT / dvc_file).read_text())["stages"][name]


def code_deps(st: dict) -> set[str]:
    return {d for d in st["deps"] if d.endswith(".py") or d.startswith(("pipeline/", "stages/"))}


@pytest.mark.parametrize(
    "dvc_file, name, sources, params",
    [
        ("dvc.yaml", "train", identity.TRAIN_SOURCES, identity.TRAIN_PARAMS),
        ("pipelines/tune/dvc.yaml", "tune", identity.TUNE_SOURCES, identity.TUNE_PARAMS),
    ],
)
def test_dvc_deps_are_the_run_identity(dvc_file, name, sources, params):
    st = stage(dvc_file, name)
    assert code_deps(st) == set(sources)
    assert st["params"] == list(params)


def test_every_train_key_is_either_result_or_operational():
    keys = {f"train.{k}" for k in PARAMS["train"]}
    assert keys == set(identity.TRAIN_RESULT_KEYS) | set(identity.OPERATIONAL)
    assert not set(identity.TRAIN_RESULT_KEYS) & set(identity.OPERATIONAL)
    # no stage of the pipeline depends on an operational key (or section)
    for dvc_file, name in [("dvc.yaml", s) for s in ("prepare", "features", "train", "evaluate", "export")]:
        ps = stage(dvc_file, name).get("params", [])
        assert not {p for p in ps if p in identity.OPERATIONAL or p in ("train", "tracking", "storage", "ray")}, name


def key_of(raw: dict, keys=identity.TRAIN_PARAMS, data="d" * 64, code="c" * 64) -> str:
    return identity.key(identity.identity(build_config(raw).to_dict(), keys, data, code))


OPERATIONAL_CHANGES = {
    "train.num_workers": 2,
    "train.cpus_per_worker": 2,
    "train.use_gpu": False,
    "train.checkpoint_every": 250,
    "train.keep_checkpoints": 5,
    "train.max_failures": 3,
    "train.log_every": 50,
    "tracking.experiment": "other",
    "storage.root": "/elsewhere",
    "ray.num_cpus": 1,
    "export.model_name": "other",
    "eval.n_samples": 100,
}


@pytest.mark.parametrize("key, value", OPERATIONAL_CHANGES.items())
def test_operational_keys_leave_the_training_identity(key, value):
    assert key_of(deep_merge(PARAMS, unflatten({key: value}))) == key_of(PARAMS)


RESULT_CHANGES = {
    "seed": 1,
    "model.hidden": 64,
    "model.d_norm": "spectral",
    "loss.name": "hinge",
    "loss.r1_gamma": 1.0,
    "train.steps": 20,
    "train.batch_size": 128,
    "train.lr_g": 0.002,
    "train.betas": [0.0, 0.9],
    "train.n_critic": 2,
    "train.precision": "bf16",
    "train.ema": 0.0,
    "train.ada.target": 0.5,
    "train.pool_size": 0,
    "eval.every": 500,
    "eval.live_samples": 500,
}


@pytest.mark.parametrize("key, value", RESULT_CHANGES.items())
def test_result_keys_make_a_new_identity(key, value):
    assert key_of(deep_merge(PARAMS, unflatten({key: value}))) != key_of(PARAMS)


def test_data_and_code_make_a_new_identity():
    assert key_of(PARAMS, data="e" * 64) != key_of(PARAMS)
    assert key_of(PARAMS, code="f" * 64) != key_of(PARAMS)


def test_the_sweep_identity_covers_what_the_tune_stage_reads():
    base = key_of(PARAMS, identity.TUNE_PARAMS)
    for key, value in {"eval.live_samples": 500, "tune.num_samples": 3, "train.checkpoint_every": 500}.items():
        assert key_of(deep_merge(PARAMS, unflatten({key: value})), identity.TUNE_PARAMS) != base, key
    assert key_of(deep_merge(PARAMS, unflatten({"train.log_every": 10})), identity.TUNE_PARAMS) == base


def copy_sources(tmp: Path, sources) -> Path:
    for rel in identity.expand(ROOT, tuple(sources)):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text((ROOT / rel).read_text())
    return tmp


SOURCES = sorted(set(identity.expand(ROOT, identity.TRAIN_SOURCES)) | set(identity.expand(ROOT, identity.TUNE_SOURCES)))


@pytest.mark.parametrize("rel", SOURCES)
def test_a_behaviour_edit_changes_the_fingerprint_a_comment_does_not(tmp_path: Path, rel: str):
    root = copy_sources(tmp_path, SOURCES)
    sources = tuple(SOURCES)
    before = identity.source_fingerprint(root, sources)
    path = root / rel
    text = path.read_text()

    # comments, blank lines, a reworded module docstring: the same behaviour, the same identity
    doc_end = text.index('"""', 3) + 3
    path.write_text('"""Reworded."""' + text[doc_end:].replace("\n\n", "\n\n# a note\n\n", 3) + "\n# end\n")
    assert identity.source_fingerprint(root, sources) == before

    # a constant changed anywhere in the code: a new identity
    path.write_text(text + "\n_PROBE = 1\n")
    assert identity.source_fingerprint(root, sources) != before


def test_the_losses_edit_of_the_bug_report_changes_the_fingerprint(tmp_path: Path):
    root = copy_sources(tmp_path, identity.TRAIN_SOURCES)
    before = identity.source_fingerprint(root, identity.TRAIN_SOURCES)
    losses = root / "pipeline/core/losses.py"
    text = losses.read_text()
    assert "lambda f: F.softplus(-f).mean()" in text
    losses.write_text(text.replace("lambda f: F.softplus(-f).mean()", "lambda f: 0 * F.softplus(-f).mean()"))
    assert identity.source_fingerprint(root, identity.TRAIN_SOURCES) != before


def test_a_missing_source_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="pipeline/core/losses.py"):
        identity.source_fingerprint(tmp_path, ("pipeline/core/losses.py",))


def test_pick_takes_sections_and_leaves():
    d = build_config(PARAMS).to_dict()
    got = identity.pick(d, ("seed", "train.ada", "train.lr_g"))
    assert got == {"seed": d["seed"], "train.ada": d["train"]["ada"], "train.lr_g": d["train"]["lr_g"]}


def _imported(rel: str) -> set[str]:
    """The repository modules `rel` imports (top-level and inside functions)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse((ROOT / rel).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "stages"):
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]  # a package or its modules
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "stages")]
        for n in names:
            path = n.replace(".", "/")
            if (ROOT / f"{path}.py").is_file():
                out.add(f"{path}.py")
            elif (ROOT / path / "__init__.py").is_file():  # a package: its __init__ runs
                out.add(f"{path}/__init__.py")
    return out


@pytest.mark.parametrize(
    "stage_file,sources", [("stages/train.py", identity.TRAIN_SOURCES), ("stages/tune.py", identity.TUNE_SOURCES)]
)
def test_every_module_a_stage_runs_is_in_its_identity_or_declared_not_to_shape_results(stage_file, sources):
    seen, todo = set(), [stage_file]
    while todo:
        rel = todo.pop()
        if rel not in seen:
            seen.add(rel)
            todo += sorted(_imported(rel))
    missing = seen - set(identity.expand(ROOT, sources)) - set(identity.NOT_RESULT_SHAPING)
    assert not missing, f"{stage_file} runs {sorted(missing)}: add them to the identity's sources (and dvc.yaml)"


@pytest.mark.parametrize("sources", [identity.TRAIN_SOURCES, identity.TUNE_SOURCES])
def test_the_running_checkouts_fingerprint_reads_the_stages_own_sources(sources):
    assert identity.CODE_ROOT == ROOT
    assert identity.code_fingerprint(sources) == identity.source_fingerprint(ROOT, sources)
