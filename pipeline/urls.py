"""Input and output URLs: how they are shown or stored (redacted), and how they name outputs (stems).

A URL may carry secrets: userinfo (`s3://KEY:SECRET@bucket/...`, `https://user:pw@host/...`) and,
for http(s), query values and fragments (`?token=...`, `?X-Amz-Signature=...`). The real URL is
used only to read or write data; everything shown or stored (messages, logs, `_failed/`,
`_run.json`, manifests, the `shard` column) goes through `redact_url` / `redact_text`, and
output names (stems) never hold a scheme, credentials or a query.

Stems are made by one function, `shard_stems`, a pure function of the set of input URLs: each
URL is reduced to its location (scheme, host, path segments; local paths absolute), the folders
all inputs share are dropped, and what is left, normalised by `normalize_stem`, names the
output. Inputs with no common root keep the scheme (and host) as their first segments.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

NO_LISTING = {"http", "https"}  # no listing: `*?[` are literal; `?` starts a query, `#` a fragment
GLOB_CHARS = "*?["
TAR_EXTS = (".tar.gz", ".tgz", ".tar")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(.*)$", re.S)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_STEM_UNSAFE = re.compile(r"[\\?#\x00-\x1f\x7f]")


class StemError(ValueError):
    """An input that cannot name an output (nothing left of its name)."""


@dataclass(frozen=True)
class UrlParts:
    scheme: str          # "file" for local paths
    userinfo: str        # "" when none
    host: str            # the netloc without userinfo ("" for local paths)
    path: str
    query: str | None    # http(s) only; None when absent
    fragment: str | None
    local: bool          # a plain local path (no scheme)


def split_url(url: str) -> UrlParts:
    m = _URL.match(url)
    if m is None:
        return UrlParts("file", "", "", url, None, None, True)
    scheme, netloc, rest = m.group(1).lower(), m.group(2), m.group(3)
    query = fragment = None
    if scheme in NO_LISTING:
        # an http(s) netloc ends at the first / ? or #
        cut = min((i for i in (netloc.find("?"), netloc.find("#")) if i >= 0), default=len(netloc))
        netloc, rest = netloc[:cut], netloc[cut:] + rest
        rest, hash_, frag = rest.partition("#")
        fragment = frag if hash_ else None
        rest, qmark, q = rest.partition("?")
        query = q if qmark else None
    userinfo, at, host = netloc.rpartition("@")
    return UrlParts(scheme, userinfo if at else "", host, rest, query, fragment, False)


def redact_url(url: str) -> str:
    """The URL as it may be shown or stored: userinfo, query values and fragment replaced by ***."""
    p = split_url(url)
    if p.local or not (p.userinfo or p.query or p.fragment):
        return url
    out = f"{p.scheme}://{'***@' if p.userinfo else ''}{p.host}{p.path}"
    if p.query:
        out += "?" + "&".join(f"{kv.partition('=')[0]}=***" if "=" in kv else "***"
                              for kv in p.query.split("&"))
    if p.fragment:
        out += "#***"
    return out


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (error messages of libraries quote the URLs they read)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text) if "://" in text else text


def has_glob(url: str) -> bool:
    """A pattern to list: glob characters in a URL whose scheme can list (never http/https)."""
    p = split_url(url)
    return p.scheme not in NO_LISTING and any(ch in p.path for ch in GLOB_CHARS)


def s3_credentials(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without userinfo, {key, secret} from it) for s3:// URLs; s3fs reads no userinfo."""
    p = split_url(url)
    if p.scheme not in ("s3", "s3a") or not p.userinfo:
        return url, {}
    key, colon, secret = p.userinfo.partition(":")
    creds = {"key": unquote(key)}
    if colon:
        creds["secret"] = unquote(secret)
    return f"{p.scheme}://{p.host}{p.path}", creds


def with_userinfo(url: str, userinfo: str) -> str:
    """`url` (as listed, without credentials) with the userinfo of the pattern it came from."""
    if not userinfo or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{userinfo}@{rest}"


def location(url: str) -> list[str]:
    """Where an input is, as segments: scheme, host, path (local paths absolute); no secrets."""
    p = split_url(url)
    if p.scheme == "file":
        path = p.path if not p.local else os.path.abspath(p.path)
        segs = ["file", *path.split("/")]
    else:
        segs = [p.scheme, p.host, *p.path.split("/")]
    return [s for s in segs if s not in ("", ".")]


def normalize_stem(stem: str) -> str:
    """A stem as a relative output name: no leading "/", no empty or "." segments, no "..",
    no backslash, `?`, `#` or control characters (percent-encoded). Idempotent."""
    segs = [s for s in stem.split("/") if s not in ("", ".")]
    segs = ["%2E%2E" if s == ".." else _STEM_UNSAFE.sub(lambda m: f"%{ord(m.group(0)):02X}", s) for s in segs]
    return "/".join(segs)


def shard_stems(urls: Sequence[str]) -> list[str]:
    """The output name of each input: its location below the folders all inputs share, without
    the tar extension. Depends only on the set of URLs (not their order)."""
    locs = [location(u) for u in urls]
    common = min((len(loc) - 1 for loc in locs), default=0)
    for i in range(common):
        if any(loc[i] != locs[0][i] for loc in locs):
            common = i
            break
    stems = []
    for url, loc in zip(urls, locs, strict=True):
        rel = "/".join(loc[common:])
        for ext in TAR_EXTS:
            if rel.endswith(ext):
                rel = rel[: -len(ext)]
                break
        stem = normalize_stem(rel)
        if not stem or rel.endswith("/"):
            raise StemError(f"cannot name an output for input {redact_url(url)!r}")
        stems.append(stem)
    return stems
