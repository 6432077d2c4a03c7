"""Evaluation metrics: prompt adherence (shapes benchmark), FID/KID and their Inception extractor."""

from .adherence import Prompt, aggregate, markdown_table, run_benchmark, wilson_interval
from .fid import fid_score, frechet_distance, gaussian_stats, kid_score, mmd2_unbiased

__all__ = ["Prompt", "aggregate", "markdown_table", "run_benchmark", "wilson_interval",
           "fid_score", "frechet_distance", "gaussian_stats", "kid_score", "mmd2_unbiased"]
