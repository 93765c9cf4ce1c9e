"""What every stage shares: the params argument, config loading and the error boundary."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from pipeline import outputs, tracking
from pipeline.config import Config, ConfigError, load_config

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "creating tables" chatter in the terminal


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    return p


# input paths several stages read; each stage's own outputs are declared in the stage with `path`
INPUTS = {
    "--data": (outputs.PREPARED, "prepared data folder"),
    "--models": (outputs.MODELS, "trained models folder"),
    "--features": (outputs.FEATURES, "feature extractor folder"),
    "--train-metrics": (outputs.TRAIN_METRICS, "train stage metrics"),
    "--eval-metrics": (outputs.EVAL_METRICS, "evaluate stage metrics"),
}


def path(p: argparse.ArgumentParser, flag: str, default: str, what: str) -> None:
    p.add_argument(flag, default=default, help=f"{what} (default: %(default)s)")


def inputs(p: argparse.ArgumentParser, *flags: str) -> None:
    for flag in flags:
        path(p, flag, *INPUTS[flag])


def config(args: argparse.Namespace) -> Config:
    return load_config(args.params)


def tracking_uri(cfg: Config) -> str:
    """The MLflow tracking URI for this stage, checked to answer before any work starts."""
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    return uri


def run(body: Callable[[], None]) -> int:
    """Run a stage body; user-facing failures print one line and exit non-zero."""
    try:
        body()
        return 0
    except ConfigError as e:
        print(f"error: invalid params:\n{e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, ConnectionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
