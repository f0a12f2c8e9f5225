"""Tables and figures from tidy frames. This package never imports torch."""

from reports.render import ReportError, read_frames, render_report, render_scaling

__all__ = ["ReportError", "read_frames", "render_report", "render_scaling"]
