"""Marketplace publishing without a model: profiles as data, finishing, marking read back by readers
nobody here wrote (exiftool, c2pa-python's Reader), compliance checks, config errors and `shoe-lora publish`."""

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from shoe_lora_pipeline.cli import main as cli_main
from shoe_lora_pipeline.core import finishing, marking
from shoe_lora_pipeline.core.compliance import check_file
from shoe_lora_pipeline.core.config import ConfigError, load_config
from shoe_lora_pipeline.core.lora_io import read_provenance
from shoe_lora_pipeline.core.marketplace import BUILTIN_PROFILES, ProfileError, resolve_profile
from shoe_lora_pipeline.core.renders.publish import PublishOptions, publish_image

OFF_WHITE = (238, 236, 230)
SHOE_WHITE = (252, 252, 252)
AMAZON = BUILTIN_PROFILES["amazon_main"]


SNEAKER_BOX = (240, 500, 600, 680)  # a third of the frame's width, left of centre


def white_sneaker(size: int = 1024, box: tuple[int, int, int, int] = SNEAKER_BOX) -> Image.Image:
    """A white sneaker (brighter than the backdrop), grey outline and sole, small and off-centre, with a
    soft contact shadow, on an off-white backdrop."""
    img = Image.new("RGB", (size, size), OFF_WHITE)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d.ellipse((x0 - w // 18, y1 - h // 11, x1 + w // 6, y1 + h // 6), fill=(205, 204, 200))  # contact shadow
    line = max(1, w // 60)
    d.rounded_rectangle(box, h // 5, fill=SHOE_WHITE, outline=(170, 170, 170), width=line)
    d.rectangle((x0 + line, y1 - h // 6, x1 - line, y1 - h // 22), fill=(120, 120, 125))  # sole stripe
    d.line((x0 + w // 6, y0 + h // 4, x0 + w // 2, y0 + h // 4), fill=(60, 60, 200), width=max(1, w // 45))
    return img


def exiftool(*args: str) -> dict:
    """exiftool's tags (``-G1`` names); skips the rest of the test without exiftool, as the browser test
    does without Chromium (.ci/run installs both)."""
    exe = shutil.which("exiftool")
    if exe is None:
        pytest.skip("no exiftool on PATH (Debian: apt-get install libimage-exiftool-perl)")
    out = subprocess.run([exe, "-j", "-G1", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def test_profiles_are_data_overridable_key_by_key() -> None:
    assert resolve_profile("amazon_main") is AMAZON
    assert AMAZON.min_side == 1000 and AMAZON.target_side == 2000 and AMAZON.fill_min == 0.85
    custom = resolve_profile({"name": "amazon_main", "target_side": 1600})
    assert custom.target_side == 1600 and custom.min_side == 1000 and custom.format == "jpeg"
    new = resolve_profile({"name": "my_shop", "based_on": "shopify", "format": "jpeg", "aspect": "4:5"})
    assert new.target_size == (1638, 2048) and new.max_bytes == BUILTIN_PROFILES["shopify"].max_bytes
    with pytest.raises(ProfileError, match="unknown profile 'amazon'"):
        resolve_profile("amazon")
    with pytest.raises(ProfileError, match="unknown key.*colour"):
        resolve_profile({"name": "amazon_main", "colour": "red"})
    with pytest.raises(ProfileError, match="name = '../x'"):  # also a folder and an asset check name
        resolve_profile({"name": "../x", "based_on": "shopify"})
    with pytest.raises(ProfileError, match="min_side ≤ target_side"):
        resolve_profile({"name": "amazon_main", "target_side": 500})


def test_white_sneaker_on_off_white_keeps_its_shoe_pixels() -> None:
    src = white_sneaker()
    for profile in BUILTIN_PROFILES.values():
        out = finishing.finish(src, profile, shadow="remove")
        assert out.image is not None, out.reasons
        a = np.asarray(out.image)
        assert out.image.size == profile.target_size
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert (border == 255).all()
        assert profile.fill_min <= out.fill <= profile.fill_max
        # The shoe's white body (252, brighter than the backdrop) is still there, not snapped to 255.
        shoe = (np.abs(a.astype(int) - 252).max(axis=2) <= 1).sum()
        x0, y0, x1, y1 = SNEAKER_BOX
        expected = (x1 - x0) * (y1 - y0) * out.upscale**2 * 0.6  # the body minus outline, sole and laces
        assert shoe > expected, (profile.name, shoe, expected)
    # A global threshold ("everything ≥ 235 is white") would have erased it; the mask grown from the
    # border does not. Same image, shadow kept: the grey shadow stays, the backdrop is white.
    kept = np.asarray(finishing.finish(src, AMAZON, shadow="keep").image)
    removed = np.asarray(finishing.finish(src, AMAZON, shadow="remove").image)
    grey = lambda a: (np.abs(a.astype(int) - 204).max(axis=2) <= 4).sum()  # noqa: E731
    assert grey(kept) > 5 * max(1, grey(removed))  # (the rim hugging the sole stays product)
    # Removing the shadow leaves the dark grey sole whole (a darker grey than any soft shadow).
    sole = lambda a: (np.abs(a.astype(int) - (120, 120, 125)).max(axis=2) <= 3).sum()  # noqa: E731
    assert sole(removed) >= 0.9 * sole(kept) > 0


def test_finishing_refuses_what_it_cannot_fix() -> None:
    touching = white_sneaker(box=(0, 500, 400, 680))
    out = finishing.finish(touching, AMAZON)
    assert out.image is None and any("touches the left edge" in r for r in out.reasons)
    scene = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    out = finishing.finish(scene, AMAZON)
    assert out.image is None and any("border not near-white" in r for r in out.reasons)
    tiny = finishing.finish(white_sneaker(512, (200, 250, 260, 280)), AMAZON)
    assert tiny.image is None and "upscaling to 2000 px (publish.max_upscale 6)" in tiny.reasons[0]
    blank = Image.new("RGB", (256, 256), OFF_WHITE)
    assert "no product found" in finishing.finish(blank, AMAZON).reasons[0]


@pytest.fixture(scope="module")
def test_cert(tmp_path_factory: pytest.TempPathFactory) -> marking.SigningCredentials:
    chain, key = marking.make_test_certificate(tmp_path_factory.mktemp("cert"))
    return marking.SigningCredentials(chain, key, "es256")


@pytest.mark.parametrize("profile_name", ["amazon_main", "shopify"])  # JPEG and PNG
def test_marking_read_back_by_exiftool_and_c2pa(
    tmp_path: Path, test_cert: marking.SigningCredentials, profile_name: str
) -> None:
    import c2pa

    profile = BUILTIN_PROFILES[profile_name]
    dest = tmp_path / f"x{profile.suffix}"
    params = (
        'white sneakers\nNegative prompt: text\nSteps: 4, Seed: 7, Lora hashes: "casual_shoes_lora: 0123"'
    )
    render = {"sku": "W-1", "lora_sha256": "ab" * 32, "dagster_run_id": "run-9", "lora_provenance": {"x": 1}}
    options = PublishOptions((profile,), credentials=test_cert)
    problems, _ = publish_image(white_sneaker(), profile, dest, options, parameters=params, render=render)
    assert problems == []

    with c2pa.Reader(str(dest)) as reader:
        store = json.loads(reader.json())
    assert reader_state(store) == "Valid"
    assert [s["code"] for s in store["validation_status"]] == ["signingCredential.untrusted"]
    manifest = store["manifests"][store["active_manifest"]]
    assert manifest["claim_generator_info"][0]["name"] == "shoe_lora_pipeline"
    actions = [
        a
        for x in manifest["assertions"]
        if x["label"].startswith("c2pa.actions")
        for a in x["data"]["actions"]
    ]
    assert {"c2pa.created"} == {a["action"] for a in actions}
    assert actions[0]["digitalSourceType"] == marking.TRAINED_ALGORITHMIC_MEDIA
    ours = next(x["data"] for x in manifest["assertions"] if x["label"] == marking.C2PA_ASSERTION_LABEL)
    assert ours["lora_sha256"] == "ab" * 32 and ours["dagster_run_id"] == "run-9"

    # Our own reader agrees, and the A1111 parameters round-trip exactly.
    found = marking.read_marking(dest)
    assert found["parameters"] == params and found["render"]["sku"] == "W-1"
    assert found["c2pa"]["signer"] == "shoe_lora_pipeline test signer"

    # Tampering with one pixel byte breaks the manifest, and the compliance check says so.
    original = dest.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    dest.write_bytes(bytes(data))
    problems = check_file(dest, profile, c2pa_on=True)
    assert any("C2PA" in p or "unreadable" in p for p in problems), problems

    # A reader nobody here wrote: exiftool (on the untampered bytes).
    dest.write_bytes(original)
    tags = exiftool(str(dest))
    assert tags["XMP-iptcExt:DigitalSourceType"] == marking.TRAINED_ALGORITHMIC_MEDIA
    assert tags["ICC-header:ProfileCMMType"] or tags.get("ICC_Profile:ProfileDescription")
    comment = tags.get("ExifIFD:UserComment") or tags.get("PNG:Parameters")
    assert comment.replace("\n", " ").startswith("white sneakers Negative prompt: text Steps: 4")


def reader_state(store: dict) -> str:
    return store.get("validation_state")


def test_compliance_check_names_each_failure(tmp_path: Path) -> None:
    small = tmp_path / "small.png"
    Image.new("RGB", (300, 200), (250, 250, 250)).save(small)
    problems = check_file(small, AMAZON, c2pa_on=True)
    text = "\n".join(problems)
    for why in ("format PNG", "longest side 300", "aspect 1:1", "border pixels", "ICC profile missing"):
        assert why in text, why
    assert "DigitalSourceType is missing" in text and "no C2PA manifest" in text


def write_config(tmp_path: Path, publish: str) -> Path:
    (tmp_path / "raw").mkdir(exist_ok=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "dataset: {name: casual_shoes, raw_dir: raw, output_dir: out, resolution: 512}\n"
        "training: {base_model: tiny-sd, output_dir: out/lora}\n" + publish
    )
    return cfg


def test_config_errors_before_anything_runs(tmp_path: Path, test_cert: marking.SigningCredentials) -> None:
    def error(publish: str) -> str:
        with pytest.raises(ConfigError) as exc:
            load_config(write_config(tmp_path, publish))
        return str(exc.value)

    assert "unknown profile 'ebay'" in error("publish: {profiles: [ebay]}")
    assert "unknown key(s) dpi" in error("publish: {profiles: [{name: shopify, dpi: 300}]}")
    assert "unknown key 'publish.shade'" in error("publish: {shade: keep}")
    # The default hires pass (2 × 512 = 1024 px) exceeds a profile capped at 1000 px.
    too_big = error(
        "publish: {profiles: [{name: shopify, max_side: 1000, target_side: 1000, min_side: 800}]}"
    )
    assert "renders.hires.scale 2 makes 1024 px images, above profile 'shopify' max_side 1000" in too_big
    missing = error("publish: {c2pa: {cert_chain: nope.pem, private_key: nope.key}}")
    assert "publish.c2pa.cert_chain" in missing and "nope.pem" in missing
    # A key from another certificate: named as not matching.
    other_chain, _ = marking.make_test_certificate(tmp_path / "other")
    mismatch = error(
        f"publish: {{c2pa: {{cert_chain: {other_chain}, private_key: {test_cert.private_key}}}}}"
    )
    assert "does not match" in mismatch and str(test_cert.private_key) in mismatch
    # An expired certificate.
    with pytest.raises(marking.MarkingError, match="expired"):
        marking.check_credentials(
            test_cert.cert_chain,
            test_cert.private_key,
            "es256",
            now=dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc),
        )
    assert "does not fit the key" in error(
        f"publish: {{c2pa: {{cert_chain: {test_cert.cert_chain}, private_key: {test_cert.private_key}, algorithm: ps256}}}}"
    )
    ok = load_config(
        write_config(
            tmp_path,
            f"publish: {{c2pa: {{cert_chain: {test_cert.cert_chain}, private_key: {test_cert.private_key}}}}}",
        )
    )
    assert ok.publish.c2pa is not None and ok.publish.c2pa.cert_chain == test_cert.cert_chain


def test_cli_publish_drawn_white_shoe_passes_every_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in" / "white shoe.png"
    src.parent.mkdir()
    white_sneaker().save(src)
    corrupt = tmp_path / "in" / "broken.png"
    corrupt.write_bytes(src.read_bytes()[:300])
    not_an_image = tmp_path / "in" / "notes.png"
    not_an_image.write_text("<svg onload=alert(1)>", encoding="utf-8")
    lab = tmp_path / "in" / "lab.png"
    from PIL import ImageCms

    white_sneaker().save(lab, icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes())
    bomb = tmp_path / "in" / "bomb.png"
    Image.new("1", (3000, 3000)).save(bomb)  # 9 MP: a decompression bomb under the limit set below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)
    before = {p: p.read_bytes() for p in src.parent.iterdir()}
    cfg = write_config(tmp_path, "publish: {profiles: [amazon_main, google_merchant, shopify]}\n")
    out = tmp_path / "out"
    rc = cli_main(
        [
            "publish",
            str(src),
            str(corrupt),
            str(not_an_image),
            str(bomb),
            str(lab),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--c2pa-test-cert",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 1  # the corrupt one is flagged; the good one published to all three
    assert "broken.png\tflagged: unreadable image" in printed
    assert "notes.png\tflagged: unreadable image" in printed
    assert "lab.png\tflagged: embedded ICC profile" in printed and "is not sRGB" in printed
    assert "bomb.png\tflagged: unreadable image" in printed and "decompression bomb" in printed
    files = sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".c2pa-test" not in p.parts
    )
    assert files == ["amazon_main/white shoe.jpg", "google_merchant/white shoe.jpg", "shopify/white shoe.png"]
    for f in files:
        profile = BUILTIN_PROFILES[f.split("/")[0]]
        waived = profile.model_copy(update={"required_metadata": ("digital_source_type", "provenance")})
        assert check_file(out / f, waived, c2pa_on=True) == []
        assert marking.read_marking(out / f)["c2pa"]["validation_state"] == "Valid"
    assert {p: p.read_bytes() for p in src.parent.iterdir()} == before  # inputs only read

    # `shoe-lora audit` reads the JPEG: source type, C2PA state and signer, provenance.
    rec = read_provenance(out / "amazon_main" / "white shoe.jpg")
    assert rec["format"] == "render_jpeg"
    assert rec["extra"]["marking"]["c2pa"] == "Valid"
    assert rec["extra"]["marking"]["c2pa_signer"] == "shoe_lora_pipeline test signer"
    assert rec["extra"]["source_file"] == "white shoe.png"
    assert cli_main(["audit", str(out / "amazon_main" / "white shoe.jpg")]) == 0
    assert "trainedAlgorithmicMedia" in capsys.readouterr().out

    # Unknown profile: a clear error, nothing written.
    assert (
        cli_main(
            ["publish", str(src), "--profile", "ebay", "--out", str(tmp_path / "x"), "--config", str(cfg)]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()

    # A reader nobody here wrote: exiftool.
    for f in files:
        assert exiftool(str(out / f))["XMP-iptcExt:DigitalSourceType"] == marking.TRAINED_ALGORITHMIC_MEDIA
