"""Split a labelled data set among federated clients, IID or label-skewed by a Dirichlet prior.

Real fleets are non-IID: each board sees the classes its owner happens to photograph. The
Dirichlet split (Hsu et al. 2019, as in NIID-Bench, Flower and FedML) reproduces that with one
knob, alpha: small alpha gives each client a few dominant classes, large alpha approaches IID.
Every split is a pure function of its seed, so an experiment can be rerun, and compared across
methods, on exactly the same clients.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PARTITION_SCHEMES",
    "dirichlet_partition",
    "iid_partition",
    "label_histogram",
    "partition",
]

#: Names accepted by `partition`.
PARTITION_SCHEMES = ("iid", "dirichlet")


def _check_clients(n_samples: int, n_clients: int, min_size: int) -> None:
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if n_clients * min_size > n_samples:
        raise ValueError(
            f"cannot give each of n_clients={n_clients} clients min_size={min_size} samples "
            f"out of {n_samples}"
        )


def _group(owner: np.ndarray, n_clients: int) -> list[np.ndarray]:
    """Turn a per-sample client id into each client's sorted sample indices."""
    # A stable sort by owner keeps sample indices ascending within each client.
    order = np.argsort(owner, kind="stable")
    ends = np.cumsum(np.bincount(owner, minlength=n_clients))[:-1]
    return np.split(order, ends)


def iid_partition(n_samples: int, n_clients: int, seed: int) -> list[np.ndarray]:
    """Give each client a uniformly random share of sizes differing by at most one.

    Every client gets at least one sample: an empty client would stall a synchronous round.
    """
    _check_clients(n_samples, n_clients, 1)
    rng = np.random.default_rng(seed)
    return [np.sort(part) for part in np.array_split(rng.permutation(n_samples), n_clients)]


def dirichlet_partition(
    labels: np.ndarray,
    n_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split each class among the clients in proportions drawn from Dir(alpha, ..., alpha).

    Draws are repeated until every client holds at least `min_size` samples, because a tiny
    client gives a meaningless local update; after `max_tries` draws the combination is treated
    as infeasible in practice and a ValueError says which knob to turn.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got {labels.ndim}-d {labels.dtype}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    n = len(labels)
    _check_clients(n, n_clients, min_size)

    rng = np.random.default_rng(seed)
    classes, class_of = np.unique(labels, return_inverse=True)
    per_class = np.bincount(class_of, minlength=len(classes))
    for _ in range(max_tries):
        # Sample counts only (classes x clients); indices are drawn once a draw is accepted.
        shares = rng.dirichlet(np.full(n_clients, float(alpha)), size=len(classes))
        cuts = np.rint(np.cumsum(shares, axis=1) * per_class[:, None]).astype(np.int64)
        cuts[:, -1] = per_class  # rounding must not lose or invent samples
        counts = np.diff(cuts, axis=1, prepend=0)
        if counts.sum(axis=0).min() >= min_size:
            break
    else:
        raise ValueError(
            f"dirichlet_partition: no draw in {max_tries} tries gave all {n_clients} clients "
            f">= {min_size} samples (alpha={alpha}, {n} samples); raise alpha or lower "
            "min_size or n_clients"
        )
    # Samples grouped by class, shuffled within each class, then dealt out in class-major order
    # of `counts`: class c's first counts[c, 0] samples go to client 0, and so on.
    shuffled = rng.permutation(n)
    by_class = shuffled[np.argsort(class_of[shuffled], kind="stable")]
    owner = np.empty(n, dtype=np.int64)
    owner[by_class] = np.repeat(np.tile(np.arange(n_clients), len(classes)), counts.ravel())
    return _group(owner, n_clients)


def label_histogram(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Count each class among `labels[indices]`: the label summary a device may share.

    Only these counts leave a device (for allocation and reports), never the samples.
    """
    selected = np.asarray(labels)[np.asarray(indices, dtype=np.int64)]
    if len(selected) and (selected.min() < 0 or selected.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), found [{selected.min()}, {selected.max()}]"
        )
    return np.bincount(selected, minlength=num_classes)


def partition(
    labels: np.ndarray,
    n_clients: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split by scheme name, as configuration files and the command line give it.

    `alpha` applies to the Dirichlet scheme only; `min_size` holds for both, and for the
    balanced IID split it is only a check that there are enough samples.
    """
    if scheme == "iid":
        _check_clients(len(labels), n_clients, min_size)
        return iid_partition(len(labels), n_clients, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, n_clients, alpha, seed, min_size=min_size)
    raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(PARTITION_SCHEMES)}")
