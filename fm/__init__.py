"""fm: a foundation model for RNA velocity, with spliced and unspliced counts as two modalities of one cell."""

__version__ = "0.1.0"
