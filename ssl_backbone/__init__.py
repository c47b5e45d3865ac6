"""Self-supervised ViT backbones (DINOv2, I-JEPA, MSN/PMSN). Knows nothing of geography; torch + timm only.

Modules: ``vit`` (the DINOv2-style ViT and its token API), ``checkpoints`` (weights files → ViT),
``config`` (the strict typed-config reader every config in the project uses), ``runtime``
(processes, RNG state, schedules, atomic checkpoints: what every trainer shares), ``errors``.
"""
