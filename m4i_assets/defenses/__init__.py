"""Defenses against membership inference: the defense grid and release-time defenses (output perturbation of
what a model releases: noisy embeddings, rounded similarities, sampled decoding). The training-time ones
(DP-SGD, augmentation, early stopping) are hooks of the models' training loop: `models.training`, `models.dp`.

`release` holds the release-time defenses (no retraining); their utility is measured with
`m4i_assets.metrics.utility`, for privacy-utility curves.
"""
