"""Digest, Reference and Platform value types."""

from __future__ import annotations

import pytest

from banger_build.oci.reference import Digest, Platform, Reference, ReferenceSyntaxError

HEX = "a" * 64


@pytest.mark.parametrize(
    "text,registry,repository,tag,name",
    [
        ("debian:bookworm", "docker.io", "library/debian", "bookworm", "debian-bookworm"),
        (
            "docker.io/library/debian:bookworm",
            "docker.io",
            "library/debian",
            "bookworm",
            "debian-bookworm",
        ),
        (
            "index.docker.io/library/alpine",
            "docker.io",
            "library/alpine",
            "latest",
            "alpine-latest",
        ),
        ("ghcr.io/org/sub/img:v1.2", "ghcr.io", "org/sub/img", "v1.2", "img-v1.2"),
        ("127.0.0.1:5000/test/img:t", "127.0.0.1:5000", "test/img", "t", "img-t"),
        ("localhost/img:x", "localhost", "img", "x", "img-x"),
        ("user/img", "docker.io", "user/img", "latest", "img-latest"),
    ],
)
def test_parse_normalises_like_docker(
    text: str, registry: str, repository: str, tag: str, name: str
) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert ref.default_image_name() == name
    assert Reference.parse(str(ref)) == ref


def test_digest_references() -> None:
    ref = Reference.parse(f"debian@sha256:{HEX}")
    assert ref.digest == Digest(HEX) and ref.tag is None
    assert ref.default_image_name() == "debian-aaaaaaaaaaaa"


@pytest.mark.parametrize(
    "text", ["", " debian", "Debian:x", "debian:", "debian@sha256:abc", "a//b", "debian:t@md5:x"]
)
def test_invalid_references_are_refused(text: str) -> None:
    with pytest.raises(ReferenceSyntaxError):
        Reference.parse(text)


def test_platform() -> None:
    p = Platform.parse("linux/arm64/v8")
    assert str(p) == "linux/arm64/v8"
    assert p.matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert not p.matches({"os": "linux", "architecture": "arm64", "variant": "v7"})
    assert Platform().matches({"os": "linux", "architecture": "amd64"})
    with pytest.raises(ReferenceSyntaxError):
        Platform.parse("linux")
