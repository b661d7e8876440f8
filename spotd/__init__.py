"""spotd: keep GPU training on EC2 spot instances from losing work."""

__version__ = "0.1.0"
