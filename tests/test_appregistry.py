"""``hil.appregistry`` for real: Debian's docker-registry serving TLS with a certificate of the
session's CA, an app image pushed into it with skopeo and read back as a device's engine would
(manifest, then the config blob whose digest is the image ID)."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hil.appregistry import AppRegistry, SessionCA
from hil.errors import InfraError
from hil.refos import appimage

pytestmark = pytest.mark.skipif(
    shutil.which("docker-registry") is None or shutil.which("skopeo") is None,
    reason="needs docker-registry and skopeo (apt-get install docker-registry skopeo)")

MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SessionCA:
    return SessionCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def registry(ca: SessionCA, tmp_path: Path) -> Iterator[AppRegistry]:
    with AppRegistry(ca, tmp_path / "registry", "10.0.2.2") as reg:
        yield reg


def fetch(url: str, context: ssl.SSLContext, accept: str = "") -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10, context=context) as r:
        return bytes(r.read())


def test_pushed_image_is_served_over_tls_as_the_engine_reads_it(
        registry: AppRegistry, ca: SessionCA) -> None:
    image = appimage.busybox("aarch64")
    ref = registry.push(image.path, image.tag)
    assert ref == f"10.0.2.2:{registry.port}/{image.tag}", ref  # the device's name for it
    repo, _, tag = image.tag.partition(":")
    base = f"https://127.0.0.1:{registry.port}/v2/{repo}"
    trusting = ssl.create_default_context(cafile=str(ca.cert_path))
    manifest = json.loads(fetch(f"{base}/manifests/{tag}", trusting, MANIFEST))
    config = manifest["config"]["digest"]
    assert config == image.id, f"the registry serves config {config}, the archive's is {image.id}"
    assert json.loads(fetch(f"{base}/blobs/{config}", trusting))["architecture"] == "arm64"
    # the certificate is the session CA's: a client that does not trust it is refused
    with pytest.raises(urllib.error.URLError) as refused:
        fetch(f"{base}/manifests/{tag}", ssl.create_default_context(), MANIFEST)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError), refused.value


def test_the_certificate_names_the_address_the_device_uses(registry: AppRegistry,
                                                           ca: SessionCA) -> None:
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    # the device connects to 10.0.2.2 (QEMU's name for this host's loopback)
    with (socket.create_connection(("127.0.0.1", registry.port), timeout=10) as raw,
          context.wrap_socket(raw, server_hostname="10.0.2.2") as tls):
        assert tls.version() is not None
    with (socket.create_connection(("127.0.0.1", registry.port), timeout=10) as raw,
          pytest.raises(ssl.SSLCertVerificationError)):
        context.wrap_socket(raw, server_hostname="10.0.2.3")


def test_config_value_adds_the_session_ca_to_the_users_own(ca: SessionCA,
                                                           tmp_path: Path) -> None:
    other = SessionCA(tmp_path / "other").pem
    mine = base64.b64encode(other).decode()
    merged = ca.config_value(mine)
    pems = base64.b64decode(merged)
    assert other in pems and ca.pem in pems, "both CAs must be trusted"
    assert ca.config_value(merged) == merged, "adding the CA twice changes nothing"
    assert base64.b64decode(ca.config_value(None)) == ca.pem


def test_a_registry_that_cannot_start_is_a_rig_fault(ca: SessionCA, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        reg = AppRegistry(ca, tmp_path / "registry", "10.0.2.2", port=taken.getsockname()[1],
                          rig="qemu-test")
        with pytest.raises(InfraError) as err:
            reg.start()
    text = str(err.value)
    assert "app registry" in text and "qemu-test" in text and "address already in use" in text
