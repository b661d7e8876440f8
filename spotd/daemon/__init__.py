"""The daemon: composition root, boot, monitors, socket server, episodes and commits, watch mode, systemd."""
