"""fm: a foundation model for RNA velocity, with spliced and unspliced counts as two modalities of one cell."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # fm.load_pretrained without importing torch on `import fm`
    if name == "load_pretrained":
        from fm.checkpoint import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'fm' has no attribute {name!r}")
