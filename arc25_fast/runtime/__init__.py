"""Runtime pieces every layer may use: options, logs, threads, faults, seeds, the process group, files, queues.

Imports nothing of the package above it."""
