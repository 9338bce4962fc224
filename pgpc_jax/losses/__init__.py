"""Losses: segmentation cross-entropy (`segmentation`); contrastive and peer-method losses live
in their own modules (`contrast`: PGPC and CLUDA; `sepico`: SePiCo; `entropy`: FDA's robust
entropy)."""
