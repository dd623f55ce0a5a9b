"""App images delivered as a fleet gets them: a container registry on the rig host, over TLS.

- ``SessionCA``: a CA the session makes (in its runtime directory). Its certificate goes into
  config.json as ``balenaRootCA`` (base64 PEM): balenaOS installs that CA in the host's trust
  store (extract-balena-ca, before the engine starts), the reference OS does the same
  (config-apply), so the device's engine trusts what the CA signs, with no ``insecure-registries``
  setting that a real device would not have.
- ``AppRegistry``: Debian's ``docker-registry`` (the CNCF distribution registry) in the
  foreground under ``Popen``, reaped by us, its storage in the session's runtime directory, on
  a free port, serving a certificate of the session's CA for the address the device reaches
  the host at. ``push`` copies a ``docker save`` archive (hil/refos/appimage.py) into it with
  ``skopeo``; the device's engine then pulls ``<host>:<port>/<name>:<tag>``.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import logging
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hil.deadline import wait_until
from hil.errors import InfraError, log_tail
from hil.ntp import bind_address_for, stop_process

log = logging.getLogger(__name__)

CA_NAME = "pytest-hil session CA"
# certificates are valid from a day back: a device whose clock lags (before NTP, or under the
# NTP suite's offsets) must still accept them
BACKDATE = datetime.timedelta(days=1)
LIFETIME = datetime.timedelta(days=30)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


class SessionCA:
    """The session's CA in ``folder`` (``ca.pem``, ``ca.key``), made once and kept there."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.cert_path = folder / "ca.pem"
        self.key_path = folder / "ca.key"
        if not (self.cert_path.exists() and self.key_path.exists()):
            self._make()

    def _make(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        _write_key(key, self.key_path)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @property
    def pem(self) -> bytes:
        return self.cert_path.read_bytes()

    def config_value(self, existing: str | None = None) -> str:
        """config.json's ``balenaRootCA`` trusting this CA besides ``existing`` (the user's own
        value, kept: a PEM file may hold several certificates)."""
        old = base64.b64decode(existing) if existing else b""
        if self.pem in old:
            return str(existing)
        joined = old + (b"" if not old or old.endswith(b"\n") else b"\n") + self.pem
        return base64.b64encode(joined).decode()

    def issue(self, folder: Path, names: list[str]) -> tuple[Path, Path]:
        """A server certificate for ``names`` (IP addresses or host names): (cert, key)."""
        ca_key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.pem)
        key = _key()
        alt: list[x509.GeneralName] = []
        for n in dict.fromkeys(names):
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + LIFETIME)
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                # a TLS server's key usage, which OpenVPN's `remote-cert-tls server` requires
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = folder / "server.pem", folder / "server.key"
        _write_key(key, key_path)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path


def free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class AppRegistry:
    """``docker-registry`` serving TLS on a free port of ``bind``, for devices that reach this
    host at ``host_address``. A context manager: ``close()`` stops it and removes nothing but
    the process (its storage stays in ``folder`` for a look after the run)."""

    def __init__(self, ca: SessionCA, folder: Path, host_address: str, *,
                 port: int = 0, binary: str = "docker-registry", skopeo: str = "skopeo",
                 start_timeout: float = 30.0, rig: str = "") -> None:
        self.ca = ca
        self.folder = folder
        self.host_address = host_address
        self.bind = bind_address_for(host_address)
        self.binary, self.skopeo = binary, skopeo
        self.start_timeout = start_timeout
        self.rig = rig
        self.port = port  # 0: a free one, picked at start
        self._proc: subprocess.Popen[bytes] | None = None
        self._pushed: dict[tuple[Path, str], str] = {}

    def __repr__(self) -> str:
        return f"AppRegistry({self.bind}:{self.port} for {self.address})"

    @property
    def address(self) -> str:
        """``host:port`` as the device names the registry in an image reference."""
        return f"{self.host_address}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "registry.log"

    def log_tail(self) -> str:
        return log_tail(self.log_path, 40)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        local = "127.0.0.1" if self.bind == "0.0.0.0" else self.bind
        cert, key = self.ca.issue(self.folder, [self.host_address, local])
        # skopeo takes a directory's ca.crt as the registry's CA (containers-certs.d)
        (self.folder / "certs.d").mkdir(exist_ok=True)
        (self.folder / "certs.d" / "ca.crt").write_bytes(self.ca.pem)
        self.port = self.port or free_port(self.bind)
        conf = self.folder / "config.yml"
        conf.write_text(
            "# pytest-hil app registry (hil/appregistry.py)\n"
            "version: 0.1\n"
            "log: {level: info, formatter: text}\n"
            f"storage: {{filesystem: {{rootdirectory: {self.folder / 'data'}}}, "
            "delete: {enabled: true}}\n"
            f"http: {{addr: '{self.bind}:{self.port}', "
            f"tls: {{certificate: {cert}, key: {key}}}}}\n")
        with self.log_path.open("ab") as out:
            self._proc = subprocess.Popen([self.binary, "serve", str(conf)], stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_until(self._serving, self.start_timeout,
                       f"{self.binary} to answer GET /v2/ over TLS on {local}:{self.port}",
                       seen=self.log_tail, part="app registry", rig=self.rig, interval=0.1)
        except BaseException:
            self.close()
            raise
        log.info("%r: serving", self)

    def _serving(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise InfraError(f"{self.binary} exited with status {self._proc.returncode} at "
                             f"start\n--- registry log ---\n{self.log_tail()}",
                             part="app registry", rig=self.rig)
        try:
            return self.get("/v2/") == 200
        except (OSError, urllib.error.URLError):
            return False

    def get(self, path: str, timeout: float = 5.0) -> int:
        """The status of an HTTPS GET of ``path``, the server verified with the session's CA
        (as the device verifies it)."""
        local = "127.0.0.1" if self.bind == "0.0.0.0" else self.bind
        context = ssl.create_default_context(cafile=str(self.ca.cert_path))
        try:
            with urllib.request.urlopen(f"https://{local}:{self.port}{path}",
                                        timeout=timeout, context=context) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def push(self, archive: Path, name: str, timeout: float = 300.0) -> str:
        """Copy the ``docker save`` ``archive`` into the registry as ``name`` (``repo:tag``);
        the reference the device pulls. Each archive is pushed once per name."""
        if (archive, name) in self._pushed:
            return self._pushed[archive, name]
        local = "127.0.0.1" if self.bind == "0.0.0.0" else self.bind
        cmd = [self.skopeo, "--insecure-policy", "copy", "--quiet",
               "--dest-cert-dir", str(self.folder / "certs.d"),
               f"docker-archive:{archive}", f"docker://{local}:{self.port}/{name}"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise InfraError(f"skopeo did not push {archive.name} to {self!r} in "
                             f"{timeout:.0f}s\n--- registry log ---\n{self.log_tail()}",
                             part="app registry", rig=self.rig) from None
        if r.returncode != 0:
            raise InfraError(f"skopeo could not push {archive.name} to {self!r} (exit "
                             f"{r.returncode}): {r.stderr.strip()[-1500:]}\n"
                             f"--- registry log ---\n{self.log_tail()}",
                             part="app registry", rig=self.rig)
        self._pushed[archive, name] = f"{self.address}/{name}"
        return self._pushed[archive, name]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)

    def __enter__(self) -> AppRegistry:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
