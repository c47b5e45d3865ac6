"""Self-supervised ViT backbones (DINOv2, I-JEPA, MSN/PMSN). Knows nothing of geography; torch + timm only."""
