"""ganpipe's own commands on bad input: one line, a non-zero exit, nothing changed."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import cli

ROOT = Path(__file__).resolve().parents[2]


def test_apply_best_refuses_a_file_with_no_searched_key_and_leaves_params_alone(tmp_path: Path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_bytes()
    best = tmp_path / "best_params.yaml"
    assert cli.main(["apply-best", "--best", str(best), "--params", str(params)]) == 1
    assert "not found; run the sweep first" in capsys.readouterr().err
    for content, code, message in [
        ("train.lr_g: -1\n", 1, "holds no searched key's value"),  # flat keys, no tune.search_space
        ("[1, 2]\n", 2, "must hold keys and values (a mapping), got a list"),
    ]:
        best.write_text(content)
        assert cli.main(["apply-best", "--best", str(best), "--params", str(params)]) == code
        err = capsys.readouterr().err
        assert message in err and str(best) in err, err
        assert params.read_bytes() == before  # not even rewritten (ruamel would drop its nulls)
    best.write_text("train:\n  lr_g: 0.0005\ntune:\n  search_space:\n    train.lr_g: {loguniform: [0.0001, 0.001]}\n")
    assert cli.main(["apply-best", "--best", str(best), "--params", str(params)]) == 0
    assert "lr_g: 0.0005" in params.read_text()
