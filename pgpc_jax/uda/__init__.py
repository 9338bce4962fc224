"""Self-training building blocks of the DAFormer step: EMA teacher and pseudo-labels
(`teacher`), DACS ClassMix with colour jitter and blur (`mixing`), ImageNet feature distance
(`feature_distance`). All functions are pure, jittable and use static shapes."""
