"""The ViT's token API: what masked-image and masked-context pretraining and dense decoders rely on."""

from __future__ import annotations

import pytest
import torch

from ssl_backbone.vit import build_vit, resize_pos_embed_dinov2


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = build_vit("vit_micro").eval()
    with torch.no_grad():
        # every parameter random and the position table large, so a token that misses its
        # position, or gets another one, differs by far more than rounding
        for p in model.parameters():
            p.normal_(0, 0.2)
        model.pos_embed.normal_(0, 1)
    return model


def image(b=2, h=70, w=90):
    # not a patch multiple (pads to 80×96: a 5×6 grid, the 14×14 table resized to it)
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_masks_replace_exactly_the_masked_patches_before_positions(vit):
    x = image()
    plain, grid = vit.prepare_tokens(x)
    assert grid == (5, 6) and plain.shape == (2, 1 + 30, vit.cfg.embed_dim)
    masks = torch.rand(2, 30, generator=torch.Generator().manual_seed(2)) < 0.4
    masks[0, 0], masks[1, 0] = True, False  # both cases present in each image's batch
    masked, grid_m = vit.prepare_tokens(x, masks=masks)
    assert grid_m == grid
    pos = resize_pos_embed_dinov2(vit.pos_embed, grid)[0, 1:]  # [30, D]
    expected = (vit.mask_token + pos).expand(2, -1, -1)
    assert torch.equal(masked[:, 1:][masks], expected[masks])  # the mask token, still placed
    assert torch.equal(masked[:, 1:][~masks], plain[:, 1:][~masks])  # the rest untouched
    assert torch.equal(masked[:, 0], plain[:, 0])  # CLS untouched
    # a [B, h, w] mask is the same mask
    assert torch.equal(vit.prepare_tokens(x, masks=masks.reshape(2, 5, 6))[0], masked)


@torch.no_grad()
def test_keep_passes_only_the_chosen_patches_with_their_positions(vit):
    x = image()
    plain, grid = vit.prepare_tokens(x)
    keep = torch.tensor([[0, 7, 29, 3], [12, 5, 6, 28]])
    kept, grid_k = vit.prepare_tokens(x, keep=keep)
    assert grid_k == grid and kept.shape == (2, 1 + 4, vit.cfg.embed_dim)
    assert torch.equal(kept[:, 0], plain[:, 0])
    for b in range(2):
        assert torch.equal(kept[b, 1:], plain[b, 1:][keep[b]])
    # kept tokens cannot be laid out as a map: refused, not silently mis-shaped
    with pytest.raises(ValueError, match="cannot form"):
        vit.tokens_to_maps([kept], grid)


@torch.no_grad()
def test_run_blocks_in_parts_gives_the_taps_of_forward_taps(vit):
    x = image()
    ref = vit.forward_taps(x)
    taps_at = vit.cfg.out_indices
    tokens, grid = vit.prepare_tokens(x)
    tokens, first = vit.run_blocks(tokens, 0, 2, taps=taps_at)
    last, rest = vit.run_blocks(tokens, 2, taps=taps_at)
    assert sorted(first) == [i for i in taps_at if i < 2] and sorted(rest) == [i for i in taps_at if i >= 2]
    taps = {**first, **rest}
    ours = vit.tokens_to_maps([taps[i] for i in sorted(taps)], grid)
    assert len(ours) == len(ref) == len(taps_at)
    for (a, ca), (b, cb) in zip(ours, ref):
        assert a.shape == (2, vit.cfg.embed_dim, 5, 6)
        assert torch.equal(a, b) and torch.equal(ca, cb)
    assert torch.equal(last, taps[len(vit.blocks) - 1])


@torch.no_grad()
def test_token_api_and_timms_forward_agree(vit):
    """timm's own forward path (``forward_features``) sees the same tokens as the public API."""
    x = image()
    tokens, _ = vit.prepare_tokens(x)
    ours = vit.norm(vit.run_blocks(tokens)[0])
    assert torch.equal(ours, vit.forward_features(vit.pad_to_patch_multiple(x)))


@torch.no_grad()
def test_forward_taps_orders_by_block_and_counts_negatives_from_the_end(vit):
    x = image(1)
    a = vit.forward_taps(x, [-1, 0])
    b = vit.forward_taps(x, [0, len(vit.blocks) - 1])
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="must name blocks"):
        vit.forward_taps(x, [len(vit.blocks)])


def test_wrong_mask_shapes_are_refused(vit):
    x = image()
    with pytest.raises(ValueError, match="masks must be bool"):
        vit.prepare_tokens(x, masks=torch.zeros(2, 29, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must be bool"):
        vit.prepare_tokens(x, masks=torch.zeros(2, 30))
    with pytest.raises(ValueError, match="keep must be int64"):
        vit.prepare_tokens(x, keep=torch.zeros(2, 3, dtype=torch.int32))
