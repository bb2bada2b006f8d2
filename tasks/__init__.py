"""Prefect tasks shared by the flows: thin wrappers, each around one plain function of models/ or data/."""
