"""Data curation for pretraining, after DINOv2's pipeline: embed candidate windows with a
backbone, drop near-duplicates, cluster hierarchically with k-means and sample evenly across the
clusters, so that what is common (fields, closed forest, water) does not drown what is rare.

Invariant: for the same embeddings, settings and seed the same windows are chosen, in the same
order — every step is a deterministic function of them (greedy de-duplication in index order,
k-means from a seeded initialisation, sampling from a seeded generator) — so a curated set can be
rebuilt exactly from its inputs. torch only (this package imports nothing heavier).

The sampling is the hierarchical balanced sampling of Vo et al. 2024 (arXiv:2405.15613), as used
for DINOv2's LVD-142M: the target count is split evenly across the top-level clusters (a cluster
with fewer members gives what it has and the rest goes to the others), then within each cluster
evenly across its children, down to the points, which are drawn at random.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embed_batches(backbone, windows, batch: int = 32, mean=None, std=None) -> torch.Tensor:
    """[N, D] L2-normalised CLS embeddings of uint8 windows (an iterable of [C,S,S] tensors, C
    the backbone's bands), from the backbone's last block, input normalised with ``mean``/``std``
    (0..1 scale; a near-infrared band by :func:`ssl_backbone.vit.per_band`)."""
    from ssl_backbone.augment import OVERHEAD_MEAN, OVERHEAD_STD, band_stats

    m, s = band_stats(mean or OVERHEAD_MEAN, std or OVERHEAD_STD, backbone.cfg.in_chans)
    m, s = m[None] * 255.0, s[None] * 255.0
    out, chunk = [], []

    def flush():
        x = (torch.stack(chunk).float() - m) / s
        with torch.no_grad():
            _, cls = backbone.forward_taps(x, indices=[-1])[-1]
        out.append(F.normalize(cls.float(), dim=1))
        chunk.clear()

    for w in windows:
        chunk.append(w)
        if len(chunk) == batch:
            flush()
    if chunk:
        flush()
    return torch.cat(out) if out else torch.zeros(0, 0)


def deduplicate(emb: torch.Tensor, threshold: float = 0.95, chunk: int = 4096) -> torch.Tensor:
    """Indices kept when each embedding, in index order, is dropped if its cosine similarity to
    an already kept one reaches ``threshold`` (the embeddings are L2-normalised)."""
    kept: list[int] = []
    kept_emb = torch.zeros(0, emb.shape[1])
    for start in range(0, emb.shape[0], chunk):
        block = emb[start:start + chunk]
        # against the kept set first (one matmul), then within the block in order
        seen = (block @ kept_emb.T).amax(1) if len(kept) else torch.full((len(block),), -2.0)
        sims = block @ block.T
        local: list[int] = []
        for i in range(len(block)):
            if seen[i] >= threshold or (local and sims[i, local].max() >= threshold):
                continue
            local.append(i)
        kept += [start + i for i in local]
        kept_emb = torch.cat([kept_emb, block[local]])
    return torch.tensor(kept, dtype=torch.long)


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0, spherical: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, D], assignment [N]) by Lloyd's algorithm from a k-means++ start; with
    ``spherical`` the points and centroids are compared by cosine similarity. An empty cluster
    takes the point farthest from its centroid."""
    n = x.shape[0]
    k = max(1, min(k, n))
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(x, dim=1) if spherical else x

    def dist(a, c):
        return 1.0 - a @ c.T if spherical else torch.cdist(a, c) ** 2

    centroids = x[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, k):  # k-means++
        d = dist(x, centroids).min(1).values.clamp_min(0)
        p = d / d.sum() if d.sum() > 0 else torch.full((n,), 1.0 / n)
        centroids = torch.cat([centroids, x[torch.multinomial(p, 1, generator=gen)]])
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        d = dist(x, centroids)
        new = d.argmin(1)
        if _ > 0 and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members) == 0:
                far = int(d.min(1).values.argmax())
                centroids[j] = x[far]
                assign[far] = j
            else:
                c = members.mean(0)
                centroids[j] = F.normalize(c, dim=0) if spherical else c
    return centroids, assign


def hierarchical_kmeans(emb: torch.Tensor, levels=(64, 8), iters: int = 30, seed: int = 0
                        ) -> list[torch.Tensor]:
    """Per level, every point's cluster: level 0 clusters the points, each next level clusters
    the previous level's centroids (so level ``i`` has at most ``levels[i]`` clusters)."""
    out, points, owner = [], emb, torch.arange(emb.shape[0])
    for depth, k in enumerate(levels):
        centroids, assign = kmeans(points, k, iters, seed + depth)
        owner = assign[owner]
        out.append(owner.clone())
        points = centroids
    return out


def balanced_sample(assignments: list[torch.Tensor], target: int, seed: int = 0) -> torch.Tensor:
    """``target`` point indices sampled evenly down the hierarchy (module docstring): the
    coarsest level first. ``assignments`` as :func:`hierarchical_kmeans` returns them."""
    gen = torch.Generator().manual_seed(seed)
    n = assignments[0].shape[0]
    target = min(target, n)

    def split(points: torch.Tensor, want: int, level: int) -> list[int]:
        if level < 0:
            order = torch.randperm(len(points), generator=gen)[:want]
            return points[order].tolist()
        groups = [points[assignments[level][points] == g]
                  for g in torch.unique(assignments[level][points]).tolist()]
        sizes = [len(g) for g in groups]
        quota = [0] * len(groups)
        left = want
        open_ = [i for i in range(len(groups))]
        while left > 0 and open_:  # even shares; what a small group cannot take goes round again
            share = max(1, left // len(open_))
            for i in list(open_):
                take = min(share, sizes[i] - quota[i], left)
                quota[i] += take
                left -= take
                if quota[i] >= sizes[i]:
                    open_.remove(i)
                if left == 0:
                    break
        out: list[int] = []
        for g, q in zip(groups, quota):
            if q:
                out += split(g, q, level - 1)
        return out

    chosen = split(torch.arange(n), target, len(assignments) - 1)
    return torch.tensor(sorted(chosen), dtype=torch.long)
