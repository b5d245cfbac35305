"""Project hooks."""

from __future__ import annotations

import logging

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)


class ProjectHooks:
    """Hooks that belong to the whole project (config checks before heavy work, etc.)."""

    @hook_impl
    def after_context_created(self, context) -> None:
        logger.debug("tulip_pipelines context created for env %s", context.env)
