"""Conversion of the officially released RedNet checkpoints (OpenMMLab, PaddleClas)."""
