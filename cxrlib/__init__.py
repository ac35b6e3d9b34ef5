"""cxrlib: the thin library behind the cxr-retrieval notebooks.

Chest X-ray image <-> report retrieval with a frozen vision-language backbone and a multi-task
projector (Liang et al., arXiv 2601.05399). Modules are imported lazily by the notebooks so that
``import cxrlib`` stays cheap.
"""

__version__ = "0.1.0"


def _select_progress() -> None:
    """make's papermill runs set CXR_PLAIN_PROGRESS=1: text progress bars, so saved notebooks show 100%."""
    import os

    if os.environ.get("CXR_PLAIN_PROGRESS", "") not in ("", "0"):
        from cxrlib.interactive import select_progress

        select_progress()


_select_progress()
