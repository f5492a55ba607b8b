"""Folders of images on Ray workers: planning, the worker actor and the driver.

Ray is imported only when a job starts (``pip install "adadiff[ray]"``).
"""

from __future__ import annotations

from adadiff.scaleout.plan import JOB_REPORT, JobSettings, Plan, make_plan

__all__ = ["JOB_REPORT", "JobSettings", "Plan", "make_plan"]
