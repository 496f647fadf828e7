"""The FLUX.1 and SD3/3.5 pipeline with its tasks: apart from `api` so that opening an SD
file does not import the flow models' modules."""

from __future__ import annotations

from ldm_cli.pipeline.api import Tasks
from ldm_cli.pipeline.tasks import flow


class FlowPipeline(Tasks, flow.FlowPipeline):
    """FLUX.1 and SD3/3.5 files' pipeline with its tasks."""
