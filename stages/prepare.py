"""prepare: load the configured dataset, split it, write arrays and a manifest."""

from __future__ import annotations

import sys

from pipeline.core import data
from pipeline.io import outputs, s3
from stages import common


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ganpipe prepare", __doc__)
    common.path(p, "--out", outputs.PREPARED, "output folder")
    args = p.parse_args(argv)

    def body() -> None:
        cfg = common.config(args)
        common.check_locations(cfg, "data.path")
        fetch = s3.Reader(cfg.storage.s3_endpoint_url)
        _warn_if_untracked(cfg.data.path)
        with outputs.atomic_dir(args.out) as tmp:  # large image sets are decoded straight into it
            prepared = data.prepare(cfg.data, cfg.seed, fetch, scratch=tmp)
            data.save_prepared(prepared, tmp)
        m = prepared.manifest
        print(
            f"[prepare] {m['dataset']}: {m['n_train']} train / {m['n_val']} val samples of shape "
            f"{tuple(m['sample_shape'])}, hash {m['content_hash'][:12]} -> {args.out}"
        )

    return common.run(body)


INPUTS = "data/inputs"  # a dependency of prepare in dvc.yaml


def _warn_if_untracked(path: str | None) -> None:
    """A local data file outside data/inputs/ is read, but DVC does not see edits to it."""
    if not path or path.startswith("s3://"):
        return
    root = common.repo_root()
    inputs = (root / INPUTS).resolve()
    if not (root / path).resolve().is_relative_to(inputs):
        print(
            f"[prepare] warning: data.path {path} is outside {INPUTS}/, so DVC does not rerun prepare when it "
            f"changes; move it to {INPUTS}/ (and `dvc add` it)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    sys.exit(main())
