"""What preheat takes for an image (preheated layer by layer) and for a file."""

import pytest

from damselfly.sdk.preheat import is_image


@pytest.mark.parametrize("url", ["oci://registry:5000/team/app:v1", "https://registry:5000/v2/team/app/manifests/v1"])
def test_an_oci_url_or_a_registry_manifest_url_is_an_image(url):
    assert is_image(url)


@pytest.mark.parametrize("url", ["https://example.com/model.bin", "s3://bucket/v2/manifests", "hf://owner/repo/f"])
def test_any_other_url_is_a_file(url):
    assert not is_image(url)
