"""Tables and figures from tidy frames. This package never imports torch."""

from reports.render import ReportError, read_frames, render_report

__all__ = ["ReportError", "read_frames", "render_report"]
