"""Dagster glue: the NilusPipelines component and the definitions it builds."""

from nilus_dagster.components.pipelines import NilusPipelines

__all__ = ["NilusPipelines"]
