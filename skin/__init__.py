"""skin: distributed hyperparameter tuning of skin-lesion CNNs."""

__version__ = "0.1.0"
