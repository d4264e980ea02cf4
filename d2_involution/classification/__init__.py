"""The RedNet ImageNet-style classification trainer."""
