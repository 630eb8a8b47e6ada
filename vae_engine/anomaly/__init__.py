"""VAEOutlierDetector: a scikit-learn outlier detector on a VAE's scores, and its rules."""
