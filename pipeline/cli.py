"""`ganpipe`: one command for the stages and the chores around them.

ganpipe prepare|train|evaluate|export [--params params.yaml] ...   run one stage (as dvc.yaml does)
ganpipe check [--params params.yaml]                                validate params, print the config
ganpipe preset NAME [--params params.yaml]                          merge presets/NAME.yaml into params
ganpipe presets                                                     list presets
ganpipe remote s3://bucket/prefix                                   default DVC remote on S3, endpoint from params
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from pipeline.core.config import ConfigError, build_config, deep_merge, flatten, load_config, read_yaml, unflatten

STAGES = {
    "prepare": "load the dataset, split it, write data/prepared",
    "features": "train the evaluation feature extractor on the real images, write data/features",
    "train": "train the GAN on Ray Train, track in MLflow, write models/",
    "evaluate": "score the generator, write metrics/eval.json and plots/",
    "export": "write TorchScript + ONNX generator and the model card",
    "tune": "hyperparameter search on Ray Tune, write tune/best_params.yaml and tune/trials.csv",
}
PRESETS_DIR = "presets"
SAMPLE_FORMATS = (".npy", ".png", ".jpg", ".jpeg", ".pdf", ".svg")  # an array, or a plot matplotlib writes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "stack":
        from pipeline.io import teamstack

        return teamstack.main(argv[1:])
    if argv and argv[0] in STAGES:
        # the stage owns its arguments and --help
        return importlib.import_module(f"stages.{argv[0]}").main(argv[1:])
    p = argparse.ArgumentParser(
        prog="ganpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in STAGES.items():
        sub.add_parser(name, help=text, add_help=False)
    sub.add_parser("stack", help="start a local team stack (S3 + MLflow server) and print its settings", add_help=False)
    c = sub.add_parser("check", help="validate params and print the resolved config (a dry run)")
    c.add_argument("--params", default="params.yaml")
    s = sub.add_parser("preset", help="deep-merge presets/NAME.yaml into params.yaml")
    s.add_argument("name")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--presets-dir", default=PRESETS_DIR)
    ab = sub.add_parser("apply-best", help="merge the best trial's searched values into params.yaml")
    ab.add_argument("--best", default="tune/best_params.yaml")
    ab.add_argument("--params", default="params.yaml")
    pr = sub.add_parser("promote", help="make the registry's candidate the champion when its metric is better")
    pr.add_argument("--params", default="params.yaml")
    pr.add_argument("--metric", default=None, help="run metric to compare (default: eval/<tune.metric>)")
    pr.add_argument("--mode", choices=["min", "max"], default=None, help="default: tune.mode")
    sm = sub.add_parser("sample", help="draw samples from an exported generator")
    sm.add_argument("--model", default="export", help="an .onnx file, an export folder or models:/name@alias")
    sm.add_argument("--n", type=int, default=64)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--labels", default=None, help="class labels to cycle through, e.g. 0,1,2 (conditional models)")
    sm.add_argument("--out", default="samples.png", help=".png (plot) or .npy (array)")
    sm.add_argument("--params", default="params.yaml")
    rm = sub.add_parser(
        "remote", help="make an S3 URL the default DVC remote, with the endpoint of storage.s3_endpoint_url"
    )
    rm.add_argument("url", help="s3://bucket/prefix")
    rm.add_argument("--name", default="team")
    rm.add_argument("--params", default="params.yaml")
    ls = sub.add_parser("presets", help="list the presets")
    ls.add_argument("--presets-dir", default=PRESETS_DIR)
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            _check(args)
        elif args.command == "preset":
            apply_preset(args.name, args.params, args.presets_dir)
        elif args.command == "apply-best":
            apply_best(args.best, args.params)
        elif args.command == "promote":
            return _promote(args)
        elif args.command == "sample":
            _sample(args)
        elif args.command == "remote":
            _remote(args)
        elif args.command == "presets":
            for f in sorted(Path(args.presets_dir).glob("*.yaml")):
                first = f.read_text().splitlines()[0].lstrip("# ") if f.stat().st_size else ""
                print(f"{f.stem:20s} {first}")
    except ConfigError as e:
        print(f"error: invalid params:\n{e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        from pipeline.io import tracking

        print(f"error: {tracking.redact_text(str(e))}", file=sys.stderr)  # no credentials of a tracking URI
        return 1
    return 0


def _check(args) -> None:
    """Validate the params as every stage will: the schema, the sweep's settings and search space."""
    from pipeline.core.config import read_yaml
    from pipeline.ray import tune

    cfg = load_config(args.params)
    tune.check_tunable(cfg)
    tune.check_search(cfg, tune.parse_space(cfg.tune.search_space, read_yaml(args.params)))
    print(json.dumps(cfg.public_dict(), indent=2))


def _promote(args) -> int:
    from pipeline.io import registry, tracking

    cfg = load_config(args.params)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    promoted, reason = registry.promote(
        uri, cfg.export.model_name, args.metric or f"eval/{cfg.tune.metric}", args.mode or cfg.tune.mode
    )
    print(("promoted: " if promoted else "not promoted: ") + reason)
    return 0


def _remote(args) -> None:
    """`dvc remote add --local -d` + `endpointurl` from the one endpoint setting (storage.s3_endpoint_url,
    else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL). --local: the endpoint is this machine's business, not
    the repository's; credentials stay in the AWS chain, never in DVC's config."""
    import subprocess

    from pipeline.io import s3

    if not args.url.startswith("s3://"):
        raise ValueError(f"remote: an s3:// URL is expected, got {args.url}")
    endpoint = s3.endpoint_url(load_config(args.params).storage.s3_endpoint_url)
    cmds = [["dvc", "remote", "add", "--local", "--force", "-d", args.name, args.url]]
    if endpoint:
        cmds.append(["dvc", "remote", "modify", "--local", args.name, "endpointurl", endpoint])
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise ValueError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    print(f"DVC remote {args.name} -> {args.url}" + (f" at {endpoint}" if endpoint else " (AWS)"))


def _sample(args) -> None:
    import numpy as np

    from pipeline.io import plots, registry, tracking

    out = Path(args.out)
    if args.n < 1:
        raise ValueError(f"--n: the number of samples must be at least 1, got {args.n}")
    if args.seed < 0:
        raise ValueError(f"--seed: must be a non-negative integer, got {args.seed}")
    if out.suffix.lower() not in SAMPLE_FORMATS:
        raise ValueError(f"--out: must end in {' | '.join(SAMPLE_FORMATS)}, got {args.out!r}")
    try:
        labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    except ValueError:
        raise ValueError(f"--labels: comma-separated class numbers, e.g. 0,1,2, got {args.labels!r}") from None
    uri = None
    if args.model.startswith("models:/"):
        uri = tracking.resolve_uri(load_config(args.params).tracking.uri)
        tracking.check_reachable(uri)  # one line naming the server (its credentials hidden), as every stage
    x = registry.sample(registry.resolve_onnx(args.model, uri), args.n, args.seed, labels)
    if out.suffix == ".npy":
        np.save(out, x)
    elif x.ndim == 4:
        plots.image_grid(x, out)
    else:
        plots.scatter_2d(x, x[:0], None, out, f"{args.n} samples")
    print(f"wrote {len(x)} samples of shape {tuple(x.shape[1:])} to {out}")


def apply_preset(name: str, params_path: str, presets_dir: str = PRESETS_DIR) -> None:
    """Merge a partial params file into params.yaml, keeping its comments; refuse invalid results."""
    preset = Path(presets_dir) / f"{name}.yaml"
    if not preset.is_file():
        known = ", ".join(sorted(f.stem for f in Path(presets_dir).glob("*.yaml"))) or "none"
        raise ConfigError(f"preset {name!r}: not found in {presets_dir}/ (known: {known})")
    merge_into_params(params_path, read_yaml(preset))
    print(f"applied preset {name} to {params_path}; `git diff {params_path}` shows the change, `dvc repro` runs it")


def apply_best(best_path: str, params_path: str) -> None:
    """Merge the searched keys' best values (only those) into params.yaml."""
    if not Path(best_path).is_file():
        raise FileNotFoundError(f"{best_path}: not found; run the sweep first (dvc repro pipelines/tune/dvc.yaml)")
    best = read_yaml(best_path)
    keys = list((best.get("tune") or {}).get("search_space") or {})
    values = {k: v for k, v in flatten(best).items() if k in keys}
    if not values:  # nothing to apply: params.yaml is left as it is
        raise ValueError(
            f"{best_path}: holds no searched key's value (its tune.search_space names none); nothing applied"
        )
    merge_into_params(params_path, unflatten(values))
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    print(f"applied {shown} to {params_path}; `dvc repro` trains with them")


def merge_into_params(params_path: str, update: dict) -> None:
    """Deep-merge `update` into the params file, keeping its comments; refuse an invalid result."""
    build_config(deep_merge(read_yaml(params_path), update))  # validate before touching the file
    from ruamel.yaml import YAML  # ships with DVC; round-trips comments

    yaml = YAML()
    doc = yaml.load(Path(params_path).read_text())
    _merge_into(doc, update)
    with open(params_path, "w") as f:
        yaml.dump(doc, f)


def _merge_into(doc, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            _merge_into(doc[k], v)
        else:
            doc[k] = v


if __name__ == "__main__":
    sys.exit(main())
