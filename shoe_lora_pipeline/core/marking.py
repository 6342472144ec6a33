"""Machine-readable marking of published images as AI-generated, and reading it back.

Every published file carries, in the places the readers look:

* **XMP** ``Iptc4xmpExt:DigitalSourceType`` = IPTC ``trainedAlgorithmicMedia`` (what Google Merchant
  Center requires and exiftool reads as ``XMP-iptcExt:DigitalSourceType``): JPEG APP1, PNG iTXt
  ``XML:com.adobe.xmp``.
* the **A1111** ``parameters`` text: the PNG ``parameters`` chunk; in a JPEG the EXIF ``UserComment``
  (``UNICODE\\0`` + UTF-16BE, as A1111 writes it).
* the **JSON provenance** (``shoe_lora_render``, :mod:`core.renders.pnginfo`): a PNG text chunk; in a JPEG
  inside the XMP packet (``shoelora:Render``), since JPEG has no text chunks.
* a **C2PA manifest** (c2pa-python) when ``publish.c2pa`` is set: a ``c2pa.created`` action whose
  ``digitalSourceType`` is ``trainedAlgorithmicMedia``, the claim generator with the package version and an
  ``org.shoe_lora_pipeline.render`` assertion with the LoRA file's sha256 and the run ids, signed with the
  configured certificate chain and key. A chain from a private CA (such as :func:`make_test_certificate`'s)
  validates ("Valid") but is not *trusted*: trust needs a certificate from a CA on the C2PA trust list.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

if TYPE_CHECKING:
    from PIL import Image

    from shoe_lora_pipeline.core.marketplace import MarketplaceProfile

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XMP_PNG_KEY = "XML:com.adobe.xmp"
IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
SHOE_LORA_NS = "https://github.com/shoe-lora-pipeline/ns/1.0/"
C2PA_ASSERTION_LABEL = "org.shoe_lora_pipeline.render"
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
_ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")


class MarkingError(ValueError):
    """A signing certificate or key cannot be used; the message names the config key and file."""


# -- XMP, EXIF, ICC --------------------------------------------------------------------------------------


def xmp_packet(*, creator_tool: str, render: Mapping[str, Any] | None = None) -> bytes:
    """An XMP packet with the IPTC digital source type (and, for JPEG, the JSON provenance)."""
    extra = ""
    if render is not None:
        payload = json.dumps(dict(render), sort_keys=True, ensure_ascii=True, default=str)
        extra = f"\n   <shoelora:Render>{escape(payload)}</shoelora:Render>"
    xml = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:Iptc4xmpExt="{IPTC_EXT_NS}"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:shoelora="{SHOE_LORA_NS}"
    Iptc4xmpExt:DigitalSourceType="{TRAINED_ALGORITHMIC_MEDIA}"
    xmp:CreatorTool={quoteattr(creator_tool)}>{extra}
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""
    return xml.encode("utf-8")


def exif_user_comment(text: str) -> bytes:
    """EXIF bytes whose UserComment holds ``text`` as A1111 writes it (``UNICODE\\0`` + UTF-16BE)."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\x00" + text.encode("utf-16-be")
    return exif.tobytes()


def _decode_user_comment(raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    head, body = raw[:8], raw[8:]
    if head == b"UNICODE\x00":
        return body.decode("utf-16-be", errors="replace")  # A1111 (piexif) writes UTF-16BE
    return body.decode("utf-8", errors="replace")  # ASCII\0\0\0 or undefined: read as UTF-8


def srgb_icc() -> bytes:
    """An sRGB ICC profile (LittleCMS's built-in, through Pillow)."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def icc_description(icc: bytes) -> str | None:
    from PIL import ImageCms

    try:
        return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()
    except (OSError, ImageCms.PyCMSError):
        return None


def encode_marked(
    image: Image.Image,
    profile: MarketplaceProfile,
    *,
    parameters: str | None,
    render: Mapping[str, Any],
    creator_tool: str,
) -> bytes:
    """The file bytes of ``image`` in the profile's format with ICC, XMP, A1111 parameters (when known)
    and the JSON provenance."""
    buf = io.BytesIO()
    icc = srgb_icc()
    if profile.format == "jpeg":
        extra = {"exif": exif_user_comment(parameters)} if parameters else {}
        xmp = xmp_packet(creator_tool=creator_tool, render=render)
        image.save(buf, "JPEG", quality=profile.quality, icc_profile=icc, xmp=xmp, **extra)
    else:
        from PIL.PngImagePlugin import PngInfo

        from shoe_lora_pipeline.core.renders.pnginfo import RENDER_KEY, png_info  # (core.renders imports us)

        if parameters:
            info = png_info(parameters, render)
        else:
            info = PngInfo()
            info.add_text(
                RENDER_KEY, json.dumps(dict(render), sort_keys=True, ensure_ascii=True, default=str)
            )
        info.add_itxt(XMP_PNG_KEY, xmp_packet(creator_tool=creator_tool).decode("utf-8"))
        image.save(buf, "PNG", pnginfo=info, icc_profile=icc)
    return buf.getvalue()


# -- C2PA signing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningCredentials:
    """A PEM certificate chain (leaf first) and its PEM private key, checked to load, match and be valid."""

    cert_chain: Path
    private_key: Path
    algorithm: str
    timestamp_url: str | None = None

    def signer_name(self) -> str:
        from cryptography import x509

        leaf = x509.load_pem_x509_certificates(self.cert_chain.read_bytes())[0]
        return leaf.subject.rfc4514_string()


def _key_algorithm(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {256: "es256", 384: "es384", 521: "es512"}.get(key.curve.key_size, "?")
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    return "?"


def check_credentials(
    cert_chain: Path,
    private_key: Path,
    algorithm: str,
    *,
    key_prefix: str = "publish.c2pa",
    now: dt.datetime | None = None,
) -> None:
    """Raise :class:`MarkingError` naming the key and file unless the chain and key load, match, use
    ``algorithm`` and every certificate is valid now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        certs = x509.load_pem_x509_certificates(Path(cert_chain).read_bytes())
    except (OSError, ValueError) as exc:
        raise MarkingError(
            f"{key_prefix}.cert_chain = {str(cert_chain)!r}: not a readable PEM certificate chain ({exc})"
        ) from None
    try:
        key = serialization.load_pem_private_key(Path(private_key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise MarkingError(
            f"{key_prefix}.private_key = {str(private_key)!r}: not a readable unencrypted PEM private key ({exc})"
        ) from None
    leaf = certs[0]
    same = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not same:
        raise MarkingError(
            f"{key_prefix}.private_key = {str(private_key)!r} does not match the first certificate of "
            f"{key_prefix}.cert_chain = {str(cert_chain)!r} ({leaf.subject.rfc4514_string()})"
        )
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise MarkingError(
                f"{key_prefix}.cert_chain = {str(cert_chain)!r}: certificate {cert.subject.rfc4514_string()!r} "
                f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
            )
        if cert.not_valid_before_utc > now:
            raise MarkingError(
                f"{key_prefix}.cert_chain = {str(cert_chain)!r}: certificate {cert.subject.rfc4514_string()!r} "
                f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
            )
    actual = _key_algorithm(key)
    if actual != algorithm and not (actual == "ps256" and algorithm.startswith("ps")):
        raise MarkingError(
            f"{key_prefix}.algorithm = {algorithm!r} does not fit the key in {str(private_key)!r} ({actual})"
        )


def make_test_certificate(folder: Path, *, days: int = 365) -> tuple[Path, Path]:
    """A local test CA and a leaf it issued (ES256), as ``chain.pem`` (leaf + CA) and ``key.pem`` under
    ``folder``; existing files that still check out are reused. Valid in structure, never trusted."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    chain_path, key_path = folder / "chain.pem", folder / "key.pem"
    if chain_path.is_file() and key_path.is_file():
        try:
            check_credentials(chain_path, key_path, "es256")
            return chain_path, key_path
        except MarkingError:
            pass  # expired or damaged: make new ones
    now = dt.datetime.now(dt.timezone.utc)

    def usage(**on: bool) -> x509.KeyUsage:
        names = [
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ]
        return x509.KeyUsage(**{n: on.get(n, False) for n in names})

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "shoe_lora_pipeline TEST CA (not trusted)"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoe_lora_pipeline test"),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days + 1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "shoe_lora_pipeline test signer"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shoe_lora_pipeline test"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    from shoe_lora_pipeline.core.fsutil import atomic_write_file

    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    chain = leaf.public_bytes(pem) + ca.public_bytes(pem)
    key = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_file(chain_path, lambda p: Path(p).write_bytes(chain))
    atomic_write_file(key_path, lambda p: Path(p).write_bytes(key))
    key_path.chmod(0o600)
    return chain_path, key_path


def c2pa_manifest(
    *, title: str, mime_type: str, version: str, assertion: Mapping[str, Any]
) -> dict[str, Any]:
    """The manifest definition: ``c2pa.created`` by a trained model, and our render assertion."""
    agent = {"name": "shoe_lora_pipeline", "version": version}
    return {
        "claim_generator_info": [agent],
        "title": title,
        "format": mime_type,
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                            "softwareAgent": agent,
                        }
                    ]
                },
            },
            {"label": C2PA_ASSERTION_LABEL, "data": dict(assertion)},
        ],
    }


def c2pa_sign(
    data: bytes, mime_type: str, manifest: Mapping[str, Any], credentials: SigningCredentials
) -> bytes:
    """``data`` with the C2PA manifest embedded and signed."""
    import c2pa

    info = c2pa.C2paSignerInfo(
        credentials.algorithm,
        credentials.cert_chain.read_bytes(),
        credentials.private_key.read_bytes(),
        credentials.timestamp_url,
    )
    with c2pa.Signer.from_info(info) as signer, c2pa.Builder(dict(manifest)) as builder:
        out = io.BytesIO()
        builder.sign(signer, mime_type, io.BytesIO(data), out)
        return out.getvalue()


# -- reading it back -------------------------------------------------------------------------------------

_DST_ATTR = re.compile(r"Iptc4xmpExt:DigitalSourceType\s*=\s*[\"']([^\"']*)[\"']")
_DST_ELEM = re.compile(r"<Iptc4xmpExt:DigitalSourceType>([^<]*)</Iptc4xmpExt:DigitalSourceType>")
_RENDER_ELEM = re.compile(r"<shoelora:Render>([^<]*)</shoelora:Render>")


def _xmp_text(info: Mapping[str, Any]) -> str | None:
    for key in ("xmp", XMP_PNG_KEY):
        raw = info.get(key)
        if raw:
            return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return None


def read_c2pa(path: Path) -> dict[str, Any]:
    """``{"present", "validation_state", "signer", "issuer", "actions", "assertion", "status", "error"}``."""
    import c2pa

    out: dict[str, Any] = {"present": False, "validation_state": None, "signer": None, "issuer": None}
    try:
        with c2pa.Reader(str(path)) as reader:
            store = json.loads(reader.json())
    except c2pa.C2paError as exc:
        text = str(exc)
        if "ManifestNotFound" in type(exc).__name__ or "no JUMBF" in text or "not found" in text.lower():
            return out
        return {**out, "error": text}
    out["present"] = True
    out["validation_state"] = store.get("validation_state")
    out["status"] = [s.get("code") for s in store.get("validation_status") or []]
    manifest = (store.get("manifests") or {}).get(store.get("active_manifest") or "", {})
    sig = manifest.get("signature_info") or {}
    out["signer"] = sig.get("common_name")
    out["issuer"] = sig.get("issuer")
    out["claim_generator"] = manifest.get("claim_generator_info")
    actions: list[dict[str, Any]] = []
    for a in manifest.get("assertions") or []:
        if str(a.get("label", "")).startswith("c2pa.actions"):
            actions += (a.get("data") or {}).get("actions") or []
        if a.get("label") == C2PA_ASSERTION_LABEL:
            out["assertion"] = a.get("data")
    out["actions"] = [
        {"action": a.get("action"), "digitalSourceType": a.get("digitalSourceType")} for a in actions
    ]
    return out


def read_marking(path: Path) -> dict[str, Any]:
    """What a published JPEG or PNG says about itself: ``format``, ``digital_source_type``,
    ``parameters``, ``render`` (the JSON provenance), ``icc`` (description), ``c2pa`` (:func:`read_c2pa`).
    Raises ``OSError`` for a file Pillow cannot read."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        info = dict(im.info)
        fmt = im.format
        exif = im.getexif().get_ifd(_EXIF_IFD) if fmt == "JPEG" else {}
    from shoe_lora_pipeline.core.renders.pnginfo import PARAMETERS_KEY, RENDER_KEY

    xmp = _xmp_text(info)
    dst = None
    if xmp:
        m = _DST_ATTR.search(xmp) or _DST_ELEM.search(xmp)
        dst = m.group(1) if m else None
    parameters = info.get(PARAMETERS_KEY)
    render_text = info.get(RENDER_KEY)
    if fmt == "JPEG":
        raw = exif.get(_USER_COMMENT)
        parameters = _decode_user_comment(raw) if raw else None
        m = _RENDER_ELEM.search(xmp or "")
        if m:
            from xml.sax.saxutils import unescape

            render_text = unescape(m.group(1))
    render = None
    if render_text:
        try:
            render = json.loads(render_text)
        except ValueError:
            render = None
    icc = info.get("icc_profile")
    return {
        "format": fmt,
        "digital_source_type": dst,
        "parameters": parameters,
        "render": render,
        "icc": icc_description(icc) if icc else None,
        "c2pa": read_c2pa(Path(path)),
    }
