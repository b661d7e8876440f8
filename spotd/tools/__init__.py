"""Tools around the daemon: the IMDS simulator, the demo, the installer, progress bars, test helpers."""
