"""Pipeline steps: plain typed functions (the logic) and thin Prefect task wrappers."""
