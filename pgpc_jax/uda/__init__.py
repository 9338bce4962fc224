"""Self-training building blocks: the DAFormer step's EMA teacher and pseudo-labels
(`teacher`), DACS ClassMix with colour jitter and blur (`mixing`), ImageNet feature distance
(`feature_distance`), the step's pieces as methods compose them (`dacs`); SePiCo's source
statistics and memory bank (`sepico_stats`), class-balanced crop (`class_balanced_crop`) and
day-night pseudo-label mixing and class weights (`day_night`); FDA's low-frequency amplitude
swap (`fourier`) and per-class pseudo-label thresholds (`class_thresholds`); fixed-size
memory banks (`ring_buffer`); PiPa's pair of overlapping crops (`overlap_crops`).
All functions are pure, jittable and use static shapes."""
