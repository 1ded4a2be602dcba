"""Preview writers shared by every bundle."""

from .preview import save_episode_sheet, save_orthogonal_preview, save_overlay_2d, save_report_preview
