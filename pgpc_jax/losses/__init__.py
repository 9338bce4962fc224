"""Losses: segmentation cross-entropy (`segmentation`); contrastive and peer-method losses live
in their own modules."""
