"""Metrics and ``python -m mlcm_train eval`` (``evaluate``; ``generate`` batches, decodes and times images).

Demo data (``digits``): Frechet distance in the demo classifier's feature space, prompt accuracy and the
classifier reward. Real models (local weights only): CLIP score (``clip_score``), LAION aesthetic score
(``aesthetic``), ImageReward (``image_reward``) and FID (``fid``); a missing weight file is an error naming it.
"""

from mlcm_train.eval.frechet import frechet_distance, gaussian_stats

__all__ = ["frechet_distance", "gaussian_stats"]
