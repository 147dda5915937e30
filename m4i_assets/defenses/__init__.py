"""Defenses against membership inference: training-time (DP-SGD, regularisation) and release-time
(output perturbation of what a model releases: noisy embeddings, rounded similarities, sampled decoding).

`release` holds the release-time defenses (no retraining); their utility is measured with
`m4i_assets.metrics.utility`, for privacy-utility curves.
"""
