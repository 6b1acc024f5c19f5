"""What the `faceflow` command runs: the CLI, `faceflow ui`, the Prefect server lifecycle."""
