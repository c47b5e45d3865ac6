"""Data curation (ssl_backbone.curation): near-duplicates go, k-means finds separated groups,
and balanced sampling evens out an imbalanced collection where a random sample does not."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_backbone.curation import balanced_sample, deduplicate, hierarchical_kmeans, kmeans


def _blobs(sizes, dim=16, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(len(sizes), dim, generator=gen), dim=1)
    pts, labels = [], []
    for i, n in enumerate(sizes):
        pts.append(centres[i] + spread * torch.randn(n, dim, generator=gen))
        labels += [i] * n
    return F.normalize(torch.cat(pts), dim=1), torch.tensor(labels)


def test_deduplicate_keeps_the_first_of_each_near_copy_in_order():
    x, _ = _blobs([50], spread=0.3)
    copies = F.normalize(x[:20] + 1e-4 * torch.randn(20, x.shape[1]), dim=1)
    data = torch.cat([x, copies])  # 20 near-copies after their originals
    for chunk in (16, 4096):  # copies in later chunks, and in the same chunk as the original
        assert deduplicate(data, threshold=0.999, chunk=chunk).tolist() == list(range(50))
    assert deduplicate(data, threshold=1.01).tolist() == list(range(70))  # nothing that similar


def test_kmeans_recovers_separated_groups_and_is_deterministic():
    x, labels = _blobs([40, 60, 30])
    _, assign = kmeans(x, 3, seed=1)
    for g in range(3):  # each true group is one cluster
        assert len(torch.unique(assign[labels == g])) == 1
    assert len(torch.unique(assign)) == 3
    assert torch.equal(assign, kmeans(x, 3, seed=1)[1])


def test_balanced_sampling_evens_out_an_imbalanced_collection():
    """900 points of one kind, 80 and 20 of two others: a curated sample of 60 holds each kind
    about equally (20 each), a random sample of 60 is mostly the common kind."""
    x, labels = _blobs([900, 80, 20], seed=2)
    levels = hierarchical_kmeans(x, levels=(12, 3), seed=0)
    chosen = balanced_sample(levels, 60, seed=0)
    assert len(chosen) == 60 and len(torch.unique(chosen)) == 60
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert all(18 <= c <= 22 for c in counts), counts
    random = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:60]
    assert torch.bincount(labels[random], minlength=3)[0] > 45
    assert torch.equal(chosen, balanced_sample(levels, 60, seed=0))
    # a small group gives what it has; the rest goes to the others
    chosen = balanced_sample(levels, 150, seed=0)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert counts[2] == 20 and len(chosen) == 150 and abs(counts[0] - counts[1]) <= 2, counts


def test_canopy_pretrain_curate_then_pretrain_on_the_table(tmp_path, capsys):
    """`canopy pretrain curate` on real overhead images with a (random, plumbing-only) ViT-Micro:
    the table lists the target number of distinct windows lying inside their images, the same
    table comes out twice (seeded), --uncurated gives as many, bad settings are one line, and
    `canopy pretrain --imagery TABLE` trains on exactly those windows."""
    import json

    import pyarrow.parquet as pq
    import rasterio

    from ssl_backbone.checkpoints import save_safetensors
    from ssl_backbone.vit import build_vit
    from tests.conftest import SHARED_DATA, shared
    from tests.test_predict import run_cli

    shared("overhead_rgb")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("neon_HARV_001", "neon_OSBS_001", "neon_SJER_003", "oam_manila_5b90f92d_4310"):
        (imgs / f"{name}.tif").symlink_to(SHARED_DATA / "overhead_rgb" / f"{name}.tif")
    torch.manual_seed(0)
    save_safetensors(build_vit("vit_micro").state_dict(), tmp_path / "micro.safetensors")
    args = ["pretrain", "curate", "--imagery", imgs, "--embedder", tmp_path / "micro.safetensors",
            "--target-size", 12, "--window", 128, "--clusters", "6,2", "--dedup", 0.999]
    code, out, err = run_cli(*args, "-o", tmp_path / "a.parquet", capsys=capsys)
    assert code == 0, err
    code, _, err = run_cli(*args, "-o", tmp_path / "b.parquet", capsys=capsys)
    assert code == 0, err
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.equals(b) and a.num_rows == 12
    rows = a.to_pylist()
    assert len({(r["path"], r["col"], r["row"]) for r in rows}) == 12
    for r in rows:
        with rasterio.open(r["path"]) as ds:
            assert r["col"] * r["scale"] + 128 * r["scale"] <= ds.width
            assert r["row"] * r["scale"] + 128 * r["scale"] <= ds.height
    meta = json.loads(a.schema.metadata[b"canopy_curation"])
    assert meta["candidates"] >= meta["after_dedup"] >= 12
    code, _, err = run_cli(*args[:-2], "--uncurated", "-o", tmp_path / "u.parquet", capsys=capsys)
    assert code == 0 and pq.read_table(tmp_path / "u.parquet").num_rows == 12, err
    code, _, err = run_cli(*args[:-6], "--clusters", "0,2", "-o", tmp_path / "x.parquet",
                           capsys=capsys)
    assert code == 2 and "--clusters" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.parquet").exists()
    (tmp_path / "tiny.json").write_text(json.dumps(
        {"arch": "vit_micro", "prototypes": 64, "head_hidden": 32, "head_bottleneck": 16,
         "ibot_prototypes": 64, "batch_size": 4, "epochs": 1, "drop_path_rate": 0.0,
         "crops": {"global_size": 64, "local_size": 32, "n_local": 2}}))
    code, out, err = run_cli("pretrain", "--config", tmp_path / "tiny.json", "--imagery",
                             tmp_path / "a.parquet", "-o", tmp_path / "run", "--max-steps", 2,
                             "--device", "cpu", "--precision", "fp32", capsys=capsys)
    assert code == 0 and "stopped at step 2/3" in out, err  # 12 windows, batch 4: 3 steps
