"""The reduced embedding space of a clustering, as the stages apply it (docs/algorithms.md section 3.1).

A clustering's options (cluster.dims/reduce, select.dbp.dims/reduce) name a reduction of the stored
image embeddings (pipeline.algorithms.reduce). Every reader of those embeddings for that
clustering (its training sample, its assignment, SemDeDup for the dedup clustering) reduces them
through one Space, so they all work in the same space. A PCA projection is fitted on the
clustering's training sample and saved beside its centroids (NAME.pca.npy next to NAME.npy): centroids
given by cluster.centroids or taken from a reference run bring theirs along.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from pipeline.algorithms.reduce import fit_pca, reduce, truncate
from pipeline.config import UserError
from pipeline.io import fs


class ReductionError(UserError):
    """A reduction that does not fit the embeddings or centroids it is given."""


def projection_url(centroids_url: str) -> str:
    """Where the PCA projection of a clustering lies: beside its centroids (X.npy -> X.pca.npy)."""
    return (centroids_url[:-4] if centroids_url.endswith(".npy") else centroids_url) + ".pca.npy"


def stored_width(embeddings_url: str) -> int:
    """The width of a stored image embedding, from the Parquet file's schema (no rows read)."""
    with fs.open_input(embeddings_url, block_size=2**16) as handle:
        return int(pq.ParquetFile(handle).schema_arrow.field("image_embedding").type.list_size)


@dataclass(frozen=True)
class Space:
    """The space a clustering works in: `option` (cluster, select.dbp) names its settings in errors;
    `centroids` is the URL of its centroids, beside which a PCA projection lies."""

    option: str
    dims: int | None
    method: str
    centroids: str

    @classmethod
    def of(cls, option: str, settings, centroids: str) -> "Space":
        return cls(option, settings.dims, settings.reduce, centroids)

    @property
    def projection(self) -> str:
        return projection_url(self.centroids)

    @property
    def reduces(self) -> bool:
        return self.dims is not None

    def width(self, stored: int) -> int:
        """The reduced width for embeddings stored with `stored` dimensions."""
        return stored if self.dims is None else self.dims

    def check(self, stored: int, what: str) -> None:
        """Fail before any work when `what` (embeddings stored `stored` wide) cannot give `dims`."""
        if self.dims is not None and self.dims > stored:
            raise ReductionError(f"{self.option}.dims={self.dims}: {what} hold {stored} dimensions (the model's "
                                 f"embedding dimension, or embed.store_dims); ask for at most {stored}")

    def check_centroids(self, centroids: np.ndarray, stored: int, source: str) -> None:
        """Saved centroids (and their projection) must be of this space: another run's, or cluster.centroids."""
        has_projection = fs.exists(projection_url(source))
        if self.method == "pca" and not has_projection:
            raise ReductionError(f"{self.option}.reduce=pca, but the centroids {source} have no PCA projection "
                                 f"beside them ({projection_url(source)}): they were trained without pca")
        if self.method != "pca" and has_projection:
            raise ReductionError(f"the centroids {source} were trained in a PCA space ({projection_url(source)}); "
                                 f"set {self.option}.reduce=pca and {self.option}.dims as that run did")
        if centroids.ndim != 2 or centroids.shape[1] != self.width(stored):
            raise ReductionError(f"the centroids {source} are {centroids.shape[-1]}-d, but {self.option}.dims="
                                 f"{self.dims} gives {self.width(stored)}-d embeddings; set it as the run that "
                                 f"trained them did")

    def copy_from(self, source: str) -> None:
        """Bring a PCA projection along with centroids copied from `source`."""
        if self.method == "pca":
            fs.write_bytes_atomic(self.projection, fs.read_bytes(projection_url(source)))

    def for_sample(self, x: np.ndarray) -> np.ndarray:
        """What a sampled row gives the training sample: its reduced vector, or for pca the full one
        (the projection is fitted on the whole sample)."""
        return x if self.method == "pca" else self.apply(x)

    def fit(self, sample: np.ndarray) -> np.ndarray:
        """The training sample in this space; for pca the projection is fitted on it and saved first."""
        if self.method != "pca":
            return sample
        self.check(sample.shape[1], "the training sample's embeddings")
        projection = fit_pca(sample, self.dims)
        buffer = io.BytesIO()
        np.save(buffer, projection, allow_pickle=False)
        fs.write_bytes_atomic(self.projection, buffer.getvalue())
        return self.apply(sample)

    def apply(self, x: np.ndarray, what: str = "the stored image embeddings") -> np.ndarray:
        """Stored embeddings [n, D] in this space [n, dims], float32."""
        x = np.asarray(x, np.float32)
        if len(x) == 0:
            return np.empty((0, self.dims or (x.shape[1] if x.ndim == 2 else 0)), np.float32)
        self.check(x.shape[1], what)
        if self.method == "pca":
            projection = np.load(io.BytesIO(fs.read_bytes(self.projection)), allow_pickle=False)
            if projection.shape[1] != x.shape[1]:
                raise ReductionError(f"{self.option}.reduce=pca: the projection {self.projection} is for "
                                     f"{projection.shape[1]}-d embeddings, {what} hold {x.shape[1]}")
            return reduce(x, self.dims, "pca", projection)
        return x if self.dims is None else truncate(x, self.dims)
