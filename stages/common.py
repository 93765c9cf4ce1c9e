"""What every stage shares: the params argument, config loading and the error boundary."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from pipeline import tracking
from pipeline.config import Config, ConfigError, load_config

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no "creating tables" chatter in the terminal


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    return p


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
