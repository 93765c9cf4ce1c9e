"""prepare: load the configured dataset, split it, write arrays and a manifest."""

from __future__ import annotations

import functools
import sys

from pipeline import data, outputs, s3
from stages import common


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ganpipe prepare", __doc__)
    common.path(p, "--out", outputs.PREPARED, "output folder")
    args = p.parse_args(argv)

    def body() -> None:
        cfg = common.config(args)
        common.check_locations(cfg, "data.path")
        fetch = functools.partial(s3.read_bytes, endpoint=cfg.storage.s3_endpoint_url)
        prepared = data.prepare(cfg.data, cfg.seed, fetch)
        with outputs.atomic_dir(args.out) as tmp:
            data.save_prepared(prepared, tmp)
        m = prepared.manifest
        print(
            f"[prepare] {m['dataset']}: {m['n_train']} train / {m['n_val']} val samples of shape "
            f"{tuple(m['sample_shape'])}, hash {m['content_hash'][:12]} -> {args.out}"
        )

    return common.run(body)


if __name__ == "__main__":
    sys.exit(main())
