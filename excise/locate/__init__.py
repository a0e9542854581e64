"""Locate: find the sites that carry a domain's knowledge; every method returns an Attribution."""

from excise.locate.attribution import Attribution
from excise.locate.attribution_patching import attribution_patching, fact_attributions

__all__ = ["Attribution", "attribution_patching", "fact_attributions"]
