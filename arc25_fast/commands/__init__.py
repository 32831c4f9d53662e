"""One recipe per command: its config (composed of parts), setup, run and finish. Only ``cli`` imports these."""
