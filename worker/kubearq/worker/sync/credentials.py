"""Where a worker finds a connection's credentials: `SYNC_SECRETS_DIR/<secret name>/<key>`, a Secret the chart
mounts into the workers. PostgreSQL holds only that reference (`credentials_ref`, `<secret name>/<key>`), never
the token itself; files are read on every sync, so a rotated Secret takes effect at once."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kubearq.worker.sync.provider import Credentials

logger = logging.getLogger(__name__)

NO_TOKEN = "No token configured. Please reconnect."  # noqa: S105 - the message, not a token
# A Secret's name (DNS subdomain) and a key of it (letters, digits, '-', '_', '.'), as Kubernetes allows them.
_REFERENCE = re.compile(r"(?P<secret>[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?)/(?P<key>[-._a-zA-Z0-9]{1,253})")


def check_reference(reference: str) -> str:
    """A credentials reference as `kubearq connections add` takes it: `<secret name>/<key>`."""
    match = _REFERENCE.fullmatch(reference)
    if match is None or match["key"] in (".", ".."):
        raise ValueError(f"{reference!r} is not a credentials reference: write <secret name>/<key>, the Secret "
                         "key the workers have mounted under SYNC_SECRETS_DIR")
    return reference


@dataclass(frozen=True)
class SecretsDir:
    """The mounted secrets of the workers (None: SYNC_SECRETS_DIR unset, so no connection has credentials)."""

    folder: Path | None

    def credentials(self, reference: str | None) -> tuple[Credentials | None, str]:
        """The credentials a reference names, or None and why not (in words for the user, then for the admin)."""
        if not reference:
            return None, f"{NO_TOKEN} (the connection names no credentials)"
        if self.folder is None:
            return None, f"{NO_TOKEN} (the workers have no SYNC_SECRETS_DIR to read {reference} from)"
        try:
            check_reference(reference)
        except ValueError as error:
            return None, f"{NO_TOKEN} ({error})"
        path = os.path.join(self.folder, reference)
        try:
            text = _read(path)
        except FileNotFoundError:
            return None, f"{NO_TOKEN} (the workers have no key {reference} in SYNC_SECRETS_DIR)"
        except OSError as error:
            logger.warning("cannot read the credentials file %s: %s", path, error)
            return None, f"{NO_TOKEN} (the workers cannot read {reference}: {error.strerror})"
        credentials = Credentials.from_text(text)
        if credentials.token is None:
            return None, f"{NO_TOKEN} (the key {reference} is empty)"
        return credentials, ""


def _read(path: str) -> str:
    """A small file's text (os.read in 64 KiB steps: the fan-out reads every connection's key each tick, and
    pathlib's read_text, or os.read of a large size, cost several times as much, measured)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        parts = [os.read(descriptor, 65536)]
        while len(parts[-1]) == 65536:
            parts.append(os.read(descriptor, 65536))
    finally:
        os.close(descriptor)
    return b"".join(parts).decode("utf-8", errors="replace")
