"""`make bench`: speed, caching, memory and model quality, measured side by side in one run."""
