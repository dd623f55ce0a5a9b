"""The VPN of the reference OS's cloud stand-in, as balena's VPN serves devices: Debian's OpenVPN
in server mode over TCP, a device logging in with its uuid and a key the API knows for it (the
device API key, or the provisioning key that registered it: what prepare-openvpn sends). The
API hands devices the client configuration balena's API serves (``os_config``).

The server runs in a network namespace of its own (``unshare --map-root-user --net``): its tun
device and addresses never touch the host's. socat inside that namespace joins it to a Unix
socket, and socat on the host's loopback joins that to the TCP port the devices reach
(``10.0.2.2:PORT`` from a QEMU guest). Keys are kept in a file only the server's login check
reads; they are never on a command line or in a log.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from hil.appregistry import SessionCA
from hil.cache import runtime_dir
from hil.deadline import wait_until
from hil.emu.procs import Daemon, tcp_listening
from hil.errors import InfraError
from hil.qemu.target import free_port

PART = "vpn"
INNER_PORT = 1194  # the server's port inside its namespace
# balena's API serves devices this configuration (its services.openvpn.config), with the
# server's address and port in ``remote``
CLIENT_CONFIG = """
client
remote {host} {port}
resolv-retry infinite

remote-cert-tls server
tls-version-min 1.2
ca /etc/openvpn/ca.crt
auth-user-pass /var/volatile/vpn-auth
auth-retry none
script-security 2
up /etc/openvpn-misc/upscript.sh
up-restart
down /etc/openvpn-misc/downscript.sh

comp-lzo
dev resin-vpn
dev-type tun
proto tcp
nobind

persist-key
persist-tun
verb 3
user openvpn
group openvpn

reneg-bytes 0
reneg-pkts 0
reneg-sec 0
"""
SERVER_CONFIG = """\
mode server
tls-server
proto tcp-server
local 127.0.0.1
port {port}
dev tun
topology subnet
ifconfig 10.240.0.1 255.255.0.0
ifconfig-pool 10.240.0.2 10.240.255.250
push "topology subnet"
route-gateway 10.240.0.1
push "route-gateway 10.240.0.1"
# the devices' comp-lzo: framing, never compression
comp-lzo no
push "comp-lzo no"
ca ca.crt
cert server.pem
key server.key
dh none
# devices have no certificates: they log in with their uuid (the common name) and a key
verify-client-cert none
username-as-common-name
script-security 2
auth-user-pass-verify ./login via-file
tmp-dir .
status status 1
status-version 2
keepalive 10 60
verb 3
"""
# openvpn's login check: the file it is given holds the uuid and the key; ``logins`` holds the
# accepted "uuid key" lines. awk reads both from files: no key on a command line.
LOGIN = """#!/bin/sh
exec awk 'NR == FNR { if (FNR == 1) u = $0; else if (FNR == 2) k = $0; next }
          $0 == u " " k { ok = 1 } END { exit !ok }' "$1" "$(dirname "$0")/logins"
"""


def available() -> str | None:
    """Why this host cannot run the VPN, or None when it can."""
    missing = [b for b in ("openvpn", "socat", "unshare", "ip") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt packages openvpn, socat, util-linux, " \
               "iproute2)"
    if not Path("/dev/net/tun").exists():
        return "the host has no /dev/net/tun (the tun module)"
    return None


class VpnServer:
    """Use as a context manager. ``allow(uuid, key)`` lets a device log in; ``connected()``
    lists the uuids logged in now (the server's status, written each second)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 ca: SessionCA | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="vpn-", dir=runtime_dir()))
        self._lock = threading.Lock()
        self._logins: set[tuple[str, str]] = set()
        self._daemons: list[Daemon] = []
        # the server's certificate from the session's CA (or a CA of its own); the CA goes to
        # the devices with the client configuration
        ca = ca or SessionCA(self.dir / "ca")
        ca.issue(self.dir, ["vpn"])
        (self.dir / "ca.crt").write_bytes(ca.pem)
        self.ca = ca.pem.decode()

    def client_config(self, guest_host: str) -> dict[str, str]:
        """The API's ``services.openvpn``: the client configuration and the CA."""
        return {"config": CLIENT_CONFIG.format(host=guest_host, port=self.port), "ca": self.ca}

    def allow(self, uuid: str, key: str) -> None:
        if not uuid or not key or any(c.isspace() for c in uuid + key):
            raise ValueError("a VPN login needs a uuid and a key, without spaces")
        with self._lock:
            self._logins.add((uuid, key))
            logins = self.dir / "logins"
            logins.touch(mode=0o600)
            logins.write_text("".join(f"{u} {k}\n" for u, k in sorted(self._logins)))

    def connected(self) -> list[str]:
        """The uuids logged in now: CLIENT_LIST lines of the server's status file."""
        try:
            lines = (self.dir / "status").read_text().splitlines()
        except OSError:
            return []
        return [ln.split(",")[1] for ln in lines if ln.startswith("CLIENT_LIST,")]

    def start(self) -> VpnServer:
        why = available()
        if why:
            raise InfraError(f"cannot run the VPN: {why}", part=PART)
        (self.dir / "server.conf").write_text(SERVER_CONFIG.format(port=INNER_PORT))
        login = self.dir / "login"
        login.write_text(LOGIN)
        login.chmod(0o700)
        with self._lock:  # the login check reads it from the first login on
            (self.dir / "logins").touch(mode=0o600)
        sock = self.dir / "vpn.sock"
        # loopback up first: openvpn binds to it
        inner = (f"ip link set lo up || exit 1; socat UNIX-LISTEN:{shlex.quote(str(sock))},fork "
                 f"TCP:127.0.0.1:{INNER_PORT} & exec openvpn --config server.conf")
        self._daemons.append(Daemon(
            "openvpn", ["unshare", "--map-root-user", "--net", "sh", "-c", inner],
            self.dir / "openvpn.log", cwd=self.dir, part=PART).start())

        def serving() -> bool:
            self._daemons[0].check()
            return sock.exists() and "Initialization Sequence Completed" in (
                self.dir / "openvpn.log").read_text(errors="replace")

        try:
            wait_until(serving, 20, "the VPN server to start in its namespace",
                       seen=lambda: self._daemons[0].log_tail(), interval=0.05, part=PART)
            self._listen(sock)
        except BaseException:
            self.stop()
            raise
        return self

    def _listen(self, sock: Path) -> None:
        """socat on the host's loopback, joined to the server's socket. The port was free when
        it was picked; another process may take it first, and then socat takes another."""
        for attempt in range(5):
            listen = f"TCP-LISTEN:{self.port},bind={self.host},reuseaddr,fork"
            socat = Daemon("socat", ["socat", listen, f"UNIX-CONNECT:{sock}"],
                           self.dir / "socat.log", part=PART).start()
            self._daemons.append(socat)

            def listening(socat: Daemon = socat) -> bool:
                socat.check()
                return tcp_listening(self.port, socat.pid)  # socat, not who took the port

            try:
                wait_until(listening, 10, f"socat to listen on {self.host}:{self.port}",
                           seen=lambda: "port closed", interval=0.02, part=PART)
                return
            except InfraError:
                if attempt == 4:
                    raise
                self._daemons.remove(socat)
                self.port = free_port()

    def stop(self) -> None:
        for d in reversed(self._daemons):
            d.stop(grace=1.0)
        self._daemons.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> VpnServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
