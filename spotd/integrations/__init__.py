"""Training-side integrations, each free to import its framework.

The daemon and spotd.client never import these (tests/test_layering.py)."""
