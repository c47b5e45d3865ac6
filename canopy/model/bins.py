"""From per-pixel bin logits to heights in metres, and the spread of the bin distribution.

HRCH ("linear" AdaBins normalisation, not softmax): p_k = (relu(l_k) + ε) / Σ (relu(l) + ε) with
ε = 0.1, height = scale · Σ p_k b_k with b = linspace(0.001, 10, 256) and scale = 10. All-zero
logits are a uniform distribution (≈ 50 m), so low heights need confident mass on the low bins.

CHMv2 ("chmv2_mixlog") is the same sum with other constants: ε = 1e-8 (its shift term,
``clamp(-min(relu(l)), 0, 1e-4) + 1e-8``, is always 1e-8 since relu(l) ≥ 0), scale = 8, and
bins spaced by :func:`bin_centres` ``spacing="mixlog"`` from 0.001 to 96/8 m. So one set of
functions serves both, given ``eps`` and the centres.
"""

from __future__ import annotations

import torch

BIN_EPS = 0.1  # HRCH v1's
MIXLOG_EPS = 1e-8  # CHMv2's
SPACINGS = ("linear", "log", "mixlog")


def bin_centres(n_bins: int, min_depth: float, max_depth: float, device=None,
                spacing: str = "linear") -> torch.Tensor:
    """``n_bins`` centres from ``min_depth`` to ``max_depth`` (float32): evenly spaced
    (``linear``), geometrically (``log``), or CHMv2's ``mixlog``, a per-bin blend of the two
    whose weight on the log spacing falls linearly from 1 at the first bin to 0 at the last
    (fine steps near the ground, even steps for tall trees)."""
    linear = torch.linspace(min_depth, max_depth, n_bins, device=device, dtype=torch.float32)
    if spacing == "linear":
        return linear
    lo = torch.log(torch.tensor(min_depth, dtype=torch.float32, device=device))
    hi = torch.log(torch.tensor(max_depth, dtype=torch.float32, device=device))
    log = torch.exp(torch.linspace(lo, hi, n_bins, device=device, dtype=torch.float32))
    if spacing == "log":
        return log
    if spacing == "mixlog":
        t = torch.linspace(1.0, 0.0, n_bins, device=device, dtype=torch.float32)
        return t * log + (1.0 - t) * linear
    raise ValueError(f"bin spacing must be one of {SPACINGS}, got {spacing!r}")


def bin_probabilities(logits: torch.Tensor, eps: float = BIN_EPS) -> torch.Tensor:
    """[B, K, H, W] logits → [B, K, H, W] probabilities (computed in float32)."""
    w = torch.relu(logits.float()) + eps
    return w / w.sum(dim=1, keepdim=True)


def bin_moments(logits: torch.Tensor, centres: torch.Tensor, with_second: bool = False,
                eps: float = BIN_EPS):
    """First (and second) moment of the bin distribution, [B, H, W] each, in bin units.

    Σ_k p_k b_k with p_k = (r_k + ε)/Σ(r + ε), r = relu(l), is (Σ r_k b_k + ε Σ b) / (Σ r + ε K):
    one pass over the logits instead of materialising the normalised [B, K, H, W] tensor
    (the head's output is 256 values per pixel: this matters at state scale).
    """
    r = torch.relu(logits.float())
    k = centres.numel()
    denom = r.sum(dim=1) + eps * k
    first = (torch.einsum("bkhw,k->bhw", r, centres) + eps * centres.sum()) / denom
    if not with_second:
        return first, None
    c2 = centres * centres
    second = (torch.einsum("bkhw,k->bhw", r, c2) + eps * c2.sum()) / denom
    return first, second


def expected_height(probs: torch.Tensor, centres: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, K, H, W] probabilities → [B, H, W] metres: scale · Σ p_k b_k, clipped at 0 as the
    reference does."""
    return torch.relu(torch.einsum("bkhw,k->bhw", probs, centres) * scale)


def height_spread(probs: torch.Tensor, centres: torch.Tensor, scale: float) -> torch.Tensor:
    """Standard deviation (metres) of the per-pixel height distribution over bins."""
    mu = torch.einsum("bkhw,k->bhw", probs, centres)
    second = torch.einsum("bkhw,k->bhw", probs, centres * centres)
    return torch.sqrt(torch.clamp(second - mu * mu, min=0.0)) * scale


def heights_from_logits(logits: torch.Tensor, centres: torch.Tensor, scale: float,
                        with_std: bool = False, eps: float = BIN_EPS):
    """Metres (and spread in metres) straight from logits, via :func:`bin_moments`."""
    first, second = bin_moments(logits, centres, with_second=with_std, eps=eps)
    height = torch.relu(first * scale)
    if not with_std:
        return height
    return height, torch.sqrt(torch.clamp(second - first * first, min=0.0)) * scale


# pixels per chunk in heights_from_hidden. CPU: a chunk's fp32 logits (256 bins) are 1 MiB, so
# they stay in a core's L2 cache between the matmul that makes them and the one that reduces them.
# GPU: large chunks (256 MiB of logits), or kernel launches would dominate.
HIDDEN_CHUNK_PX = {"cpu": 1024, "cuda": 1 << 18}


def heights_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        centres: torch.Tensor, scale: float, with_std: bool = False,
                        eps: float = BIN_EPS):
    """Metres (and spread) from the head's last hidden map, fusing its final 1×1 conv.

    Same values as ``heights_from_logits(conv1x1(hidden))``, computed chunk by chunk of pixels:
    logits of one chunk (``[P, K]``) are made, rectified and reduced against ``[b, b², 1]``
    while in cache. The full ``B×K×H×W`` logit tensor — 256 values per pixel, 0.5 GB for a
    batch of eight 256² tiles — is never written. On one core this took the bin-to-metres step
    from 0.24–0.40 s to 0.035 s per 256² tile (docs/performance.md). The conv runs in the caller's
    autocast dtype, as the unfused conv did; rectification and sums run in float32.
    """
    b, c, h, w = hidden.shape
    k = centres.numel()
    dev = hidden.device.type
    # the conv's dtype: autocast's if on (as the unfused conv ran), else the weights'
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    with torch.autocast(dev, enabled=False):
        x = hidden.permute(0, 2, 3, 1).reshape(-1, c).to(dtype)  # pixels × channels
        wt = weight.reshape(k, c).t().to(dtype)
        bias = bias.to(dtype)
        cols = [centres.float(), (centres * centres).float()] if with_std else [centres.float()]
        # rows: Σ r·b (, Σ r·b²), Σ r. Matrix-vector products and a row sum, not one mm with 2–3
        # output columns: MKL's sgemm is slow for that shape (19 vs 3 ms per 256² tile here)
        sums = torch.empty(len(cols) + 1, x.shape[0], dtype=torch.float32, device=hidden.device)
        step = HIDDEN_CHUNK_PX.get(dev, HIDDEN_CHUNK_PX["cuda"])
        for i in range(0, x.shape[0], step):
            r = torch.relu(torch.addmm(bias, x[i:i + step], wt).float())
            for j, col in enumerate(cols):
                torch.mv(r, col, out=sums[j, i:i + step])
            torch.sum(r, dim=1, out=sums[-1, i:i + step])
    sums = sums.reshape(-1, b, h, w)
    denom = sums[-1] + eps * k
    first = (sums[0] + eps * centres.sum()) / denom
    height = torch.relu(first * scale)
    if not with_std:
        return height
    c2 = centres * centres
    second = (sums[1] + eps * c2.sum()) / denom
    return height, torch.sqrt(torch.clamp(second - first * first, min=0.0)) * scale
