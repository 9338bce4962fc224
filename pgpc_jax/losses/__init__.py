"""Losses: segmentation cross-entropy (`segmentation`); contrastive and peer-method losses live
in their own modules (`contrast`: PGPC and CLUDA; `sepico`: SePiCo; `pipa`: PiPa's pixel
contrast; `pipa_patch`: its patch contrast; `cpsl`: CPSL's Sinkhorn, rectification and losses;
`entropy`: FDA's robust entropy)."""
