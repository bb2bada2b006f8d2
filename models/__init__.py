"""Plain-Python model code: the autoencoder, its bundle, thresholds, scoring and reports. No Prefect here."""
