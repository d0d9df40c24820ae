"""Where data lives, as pure logic (no store, no server): AWS in the US only, GCS in the
region nearest the user's country, and the country field validated."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.core.config import US_AWS_REGIONS, GcsConfig, S3Config
from pipeline.core.errors import InvalidUpload
from pipeline.storage.residency import check_country, region_for_country

GCS = GcsConfig(project="p", buckets={"us-central1": "b-us", "europe-west1": "b-eu",
                                      "asia-northeast1": "b-jp"},
                country_regions={"US": "us-central1", "TR": "europe-west1", "DE": "europe-west1",
                                 "JP": "asia-northeast1"},
                fallback_region="us-central1")


@pytest.mark.parametrize("region", US_AWS_REGIONS)
def test_aws_regions_in_the_us_are_accepted(region):
    assert S3Config(bucket="bucket", region=region).region == region


@pytest.mark.parametrize("region", ["eu-west-1", "ca-central-1", "us-gov-west-1", "ap-south-1",
                                    "US-EAST-1", "us-east-1 ", ""])
def test_aws_regions_outside_the_us_are_refused_naming_the_policy(region):
    with pytest.raises(ValidationError, match="outside the US"):
        S3Config(bucket="bucket", region=region)


@pytest.mark.parametrize(("country", "region"), [
    ("TR", "europe-west1"), ("DE", "europe-west1"), ("JP", "asia-northeast1"),
    ("US", "us-central1"), ("BR", "us-central1"), (None, "us-central1")])
def test_the_users_country_picks_the_nearest_configured_region(country, region):
    assert region_for_country(country, GCS) == region


def test_every_region_a_country_can_reach_has_a_bucket():
    with pytest.raises(ValidationError, match="no bucket"):
        GcsConfig(project="p", buckets={"us-central1": "b"}, country_regions={"TR": "europe-west1"},
                  fallback_region="us-central1")
    with pytest.raises(ValidationError, match="alpha-2"):
        GcsConfig(project="p", buckets={"us-central1": "b"}, country_regions={"tur": "us-central1"},
                  fallback_region="us-central1")


@pytest.mark.parametrize(("sent", "code"), [("tr", "TR"), (" de ", "DE"), ("", None), (None, None)])
def test_country_codes_are_normalised(sent, code):
    assert check_country(sent) == code


@pytest.mark.parametrize("sent", ["TUR", "T", "1A", "Ü1", "T\x00", "../"])
def test_other_country_values_are_refused(sent):
    with pytest.raises(InvalidUpload, match="alpha-2"):
        check_country(sent)
