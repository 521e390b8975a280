"""elvis-cli: batch ELViS re-ranking for instance-level image retrieval."""

__version__ = "0.1.0"
