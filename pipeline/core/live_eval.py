"""The cheap evaluation run during training (every `eval.every` steps) and in every Tune trial.

2D data: W1 to the validation points, plus mode metrics on ring / grid. Images: FID, class modes and
class KL in the pipeline's own extractor (the features stage), plus the label accuracy of conditional
generators. Computed on a fixed, seeded sample of `eval.live_samples`, so values along one run are
comparable with each other (FID at small n is biased upwards: compare them with the evaluate stage's
full-size numbers only loosely). Keys are prefixed `val/` in MLflow and Ray reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.core import datasets, metrics_image, training
from pipeline.core.data import to_unit


class LiveEval:
    """Holds what does not change along a run (real features, the extractor); call with a generator."""

    def __init__(
        self,
        x_val: np.ndarray,
        dataset: str,
        n: int,
        seed: int,
        extractor=None,
        classifier: bool = True,
        conditional_classes: int | None = None,
    ):
        self.dataset, self.seed = dataset, seed
        self.conditional_classes = conditional_classes
        self.n = n
        self.real = to_unit(np.asarray(x_val[:n]))
        self.extractor, self.classifier = extractor, classifier
        if extractor is not None:
            from pipeline.core import features

            self.real_f, self.real_p = features.embed(extractor, self.real)

    def __call__(self, G: torch.nn.Module, z_dim: int) -> dict[str, float]:
        # latents apart from any training draw (seed + 1), like the evaluate stage
        fake = training.sample(G, self.n, z_dim, self.seed + 1, num_classes=self.conditional_classes)
        if self.extractor is None:
            return datasets.point_scores(self.dataset, fake, self.real)
        from pipeline.core import features

        fake_f, fake_p = features.embed(self.extractor, fake)
        labels = training.sample_labels(self.n, self.conditional_classes) if self.classifier else None
        sets = metrics_image.Sets(
            self.real_f, self.real_p, fake_f, fake_p, self.extractor.num_classes, self.seed, _numpy(labels)
        )
        return {k: float(v) for k, v in metrics_image.score(sets, live=True, classifier=self.classifier).items()}


def _numpy(labels: torch.Tensor | None) -> np.ndarray | None:
    return None if labels is None else labels.numpy()


def load_extractor(features_dir: str | Path | None) -> tuple[object | None, bool]:
    """(the features stage's extractor, whether it is a trained classifier); (None, False) for 2D
    data (the stage saves no extractor) or when no folder is given."""
    path = None if features_dir is None else Path(features_dir) / "extractor.pt"
    if path is None or not path.is_file():
        return None, False
    from pipeline.core import features

    model, info = features.load_extractor(path)
    return model, info["extractor"] == "classifier"


def from_prepared(cfg, prepared, features_dir: str | Path | None) -> LiveEval:
    """The in-training evaluator of a stage: the validation split, the features stage's extractor
    for images (an error naming the folder when it is missing)."""
    extractor, classifier = load_extractor(features_dir)
    if prepared.is_image and extractor is None:
        raise FileNotFoundError(
            f"{features_dir}/extractor.pt: not found; image data is scored in the features stage's extractor "
            "(run the features stage, or set eval.every: 0)"
        )
    conditional = prepared.manifest["classes"] if cfg.model.conditional else None
    return LiveEval(prepared.x_val, cfg.data.name, cfg.eval.live_samples, cfg.seed, extractor, classifier, conditional)
