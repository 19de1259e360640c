"""A CA file the revocation check and OCSP cannot read is named by the key that configured
it: ours is ``tls.ca``, a partner's ``<partner>: https.ca``."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.transports.revocation import load_crls, read_anchors
from gateway.transports.tls import partner_trust_anchors

BROKEN = b"-----BEGIN CERTIFICATE-----\nMIIBbroken\n-----END CERTIFICATE-----\n"


def test_each_trust_anchor_file_is_named_by_its_key(tree: Path) -> None:
    config = load_config(tree / "gateway.toml")
    anchors = partner_trust_anchors(config.tls, config.partners.values())
    assert list(anchors.values()) == ["tls.ca"]  # the partners share our CA file
    assert [path for path, _ in read_anchors(anchors)] == [config.tls.ca]


@pytest.mark.parametrize("key", ["tls.ca", "MX-ANAM: https.ca"])
def test_an_unreadable_ca_file_names_its_key(tmp_path: Path, key: str) -> None:
    broken = tmp_path / "ca.pem"
    broken.write_bytes(BROKEN)
    for read in (lambda: read_anchors({broken: key}), lambda: load_crls([], {broken: key})):
        with pytest.raises(ConfigError) as caught:
            read()
        assert (caught.value.file, caught.value.key) == (str(broken), key)
        assert caught.value.reason.startswith("cannot read CA certificates: ")
