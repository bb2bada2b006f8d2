"""Plain-Python data code: Parquet I/O, schema checks, workspace layout, manifest, demo data. No Prefect here."""
