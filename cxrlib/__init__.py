"""cxrlib: the thin library behind the cxr-retrieval notebooks.

Chest X-ray image <-> report retrieval with a frozen vision-language backbone and a multi-task
projector (Liang et al., arXiv 2601.05399). Modules are imported lazily by the notebooks so that
``import cxrlib`` stays cheap.
"""

__version__ = "0.1.0"
