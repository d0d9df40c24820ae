"""Data residency: the user's country picks the GCS region nearest to them.

The table lives in configs/storage.yaml (gcs.country_regions) so operators can override it;
a country not in it goes to gcs.fallback_region.
"""

from __future__ import annotations

from pipeline.core.config import GcsConfig
from pipeline.core.errors import InvalidUpload


def check_country(value: str | None) -> str | None:
    """An ISO 3166-1 alpha-2 code (upper-cased), or None when the request sent none."""
    if value is None or value == "":
        return None
    code = value.strip().upper()
    if len(code) != 2 or not code.isascii() or not code.isalpha():
        raise InvalidUpload("country must be an ISO 3166-1 alpha-2 code such as 'TR' or 'US'",
                            problem="invalid")
    return code


def region_for_country(country: str | None, cfg: GcsConfig) -> str:
    """The region whose bucket holds this user's inputs and face data."""
    if country is None:
        return cfg.fallback_region
    return cfg.country_regions.get(country, cfg.fallback_region)
