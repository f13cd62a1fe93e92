"""The main job's report (``index.html``): `page` assembles it, `cards` describes the model, `words` puts numbers
into sentences. Each experiment's finding lives beside its result, in its own module (tl_patching.experiments)."""

from tl_patching.report.page import write_report

__all__ = ["write_report"]
