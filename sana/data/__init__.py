"""Training data: sources (folder / JSONL / WebDataset), aspect-ratio buckets, caption selection, the
resumable rank-sharded loader, and the latent cache. Importing this package loads no model."""

from sana.data.buckets import BadImage, bucket_table
from sana.data.cache import CacheConfig, build_cache
from sana.data.cached import load_null_text
from sana.data.captions import Caption, ClipScorer, caption_probabilities, score_manifest, select_caption
from sana.data.loader import DataConfig, Loader, LoaderStats, build_loader
from sana.data.sources import RawSample, detect_kind, read_samples

__all__ = [
    "BadImage",
    "CacheConfig",
    "Caption",
    "ClipScorer",
    "DataConfig",
    "Loader",
    "LoaderStats",
    "RawSample",
    "bucket_table",
    "build_cache",
    "build_loader",
    "caption_probabilities",
    "detect_kind",
    "load_null_text",
    "read_samples",
    "score_manifest",
    "select_caption",
]
