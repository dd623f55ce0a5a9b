"""A secret read from the device (``apiKey``, ``deviceApiKey``) that cannot leak by accident:
its repr is a short fingerprint, so an assertion message or a report never shows the value."""

from __future__ import annotations

import hashlib
import hmac
import os

from hil import redact


class Secret:
    """Compare with :meth:`matches`; get the value only with :meth:`reveal`."""

    __slots__ = ("_digest", "_value")

    def __init__(self, value: str | None = None, *, digest: str | None = None) -> None:
        if value is None and digest is None:
            raise ValueError("a Secret needs its value or its SHA-256")
        self._value = value
        self._digest = digest or hashlib.sha256((value or "").encode()).hexdigest()
        if value is not None:
            redact.register(value)  # whatever prints it later gets it masked

    @property
    def sha256(self) -> str:
        return self._digest

    @property
    def fingerprint(self) -> str:
        return self._digest[:12]

    def matches(self, other: str | Secret | None) -> bool:
        if other is None:
            return False
        theirs = other.sha256 if isinstance(other, Secret) else \
            hashlib.sha256(other.encode()).hexdigest()
        return hmac.compare_digest(theirs, self._digest)

    def reveal(self) -> str:
        if self._value is None:
            raise ValueError("only the SHA-256 of this secret was read (console transport)")
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and self.matches(other)

    def __hash__(self) -> int:
        return hash(self._digest)

    def __repr__(self) -> str:
        return f"Secret(sha256:{self.fingerprint}…)"

    __str__ = __repr__


def encodings(value: str) -> list[bytes]:
    """The forms a secret can take in a console log: as is, and base64 (the console shell
    transports command output base64-encoded) at each of the three byte alignments."""
    import base64

    raw = value.encode()
    forms = [raw]
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw)
        # drop the characters that depend on the padding bytes and the tail
        skip = (shift * 4 + 2) // 3
        body = enc[skip:]
        keep = (len(raw) * 4) // 3 - 4
        if keep >= 8:
            forms.append(body[:keep])
    return forms


def private_key_stretch(private_key_file: str | os.PathLike[str]) -> str:
    """A stretch of an OpenSSH ed25519 private key file's text that encodes only the secret
    seed (the file also embeds the public key, which may legitimately be shown anywhere)."""
    import base64
    from pathlib import Path

    lines = Path(private_key_file).read_text().splitlines()
    body = "".join(ln.strip() for ln in lines if ln and not ln.startswith("-----"))
    blob = base64.b64decode(body)
    pub_line = Path(str(private_key_file) + ".pub").read_text().split()
    pub = base64.b64decode(pub_line[1])[-32:]
    last = blob.rfind(pub)  # the 64-byte private key is the seed followed by the public key
    if blob.count(pub) < 3 or last < 32:
        raise ValueError(f"{private_key_file}: not an unencrypted OpenSSH ed25519 key")
    start, end = last - 32, last
    return body[-(-start * 4 // 3):end * 4 // 3]
