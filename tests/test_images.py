"""Unit tests for shared.images: defensive decoding and provenance in every output format."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import ExifTags, Image, ImageFile

from shared.contract import OutputFormat
from shared.errors import InvalidImage
from shared.images import (
    ALGORITHMICALLY_ENHANCED,
    CONTENT_TYPES,
    EXTENSIONS,
    TRAINED_ALGORITHMIC_MEDIA,
    Provenance,
    decode_image,
    encode_image,
    read_provenance,
)

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 2048 * 2048}
PROVENANCE = Provenance(
    job_id="job-123",
    generator="flux-schnell",
    refiner="refiner-v2 <&\"'>",  # exercises XML escaping
    seed=2**63 - 1,
    digital_source_type=TRAINED_ALGORITHMIC_MEDIA,
)


def gradient(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A non-uniform RGB image, so lossy and lossless encodings differ visibly."""
    image = Image.new("RGB", size)
    width, height = size
    image.putdata([(x * 4 % 256, y * 5 % 256, x * y % 256) for y in range(height) for x in range(width)])
    return image


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height; decoding its pixels would be a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_round_trip_keeps_size_and_provenance(fmt: OutputFormat) -> None:
    data = encode_image(gradient(), fmt, PROVENANCE)

    image = decode_image(data, **LIMITS)
    assert (image.mode, image.size) == ("RGB", (64, 48))
    assert read_provenance(data) == {
        "job_id": "job-123",
        "generator": "flux-schnell",
        "refiner": "refiner-v2 <&\"'>",
        "seed": str(2**63 - 1),
        "digital_source_type": TRAINED_ALGORITHMIC_MEDIA,
    }
    exif = Image.open(io.BytesIO(data)).getexif()
    assert exif[ExifTags.Base.Software] == "face-refinery"
    assert "job-123" in exif[ExifTags.Base.ImageDescription]


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_refine_only_provenance_has_no_generator_or_seed(fmt: OutputFormat) -> None:
    enhanced = Provenance("job-9", None, "identity", None, ALGORITHMICALLY_ENHANCED)

    provenance = read_provenance(encode_image(gradient(), fmt, enhanced))

    assert provenance["digital_source_type"] == ALGORITHMICALLY_ENHANCED
    assert (provenance["generator"], provenance["seed"]) == ("", "")


def test_png_is_lossless_and_has_text_chunks() -> None:
    original = gradient()
    data = encode_image(original, OutputFormat.png, PROVENANCE)

    assert decode_image(data, **LIMITS).tobytes() == original.tobytes()
    text = Image.open(io.BytesIO(data)).text
    assert text["Software"] == "face-refinery"
    assert text["refinery:job_id"] == "job-123"
    assert text["refinery:seed"] == str(2**63 - 1)


def test_png_keeps_every_pixel_of_a_large_noisy_image() -> None:
    # Noise defeats any run-length shortcut: every byte of fpng's output is exercised.
    original = Image.merge("RGB", [Image.effect_noise((517, 300), sigma) for sigma in (20, 60, 120)])

    data = encode_image(original, OutputFormat.png, PROVENANCE)

    assert decode_image(data, **LIMITS).tobytes() == original.tobytes()
    assert read_provenance(data)["job_id"] == "job-123"


def test_png_chunks_are_valid_and_metadata_precedes_the_pixels() -> None:
    data = encode_image(gradient(), OutputFormat.png, PROVENANCE)

    Image.open(io.BytesIO(data)).verify()  # every chunk's CRC and the stream's structure
    kinds, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        assert struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])[0] == zlib.crc32(kind + body)
        kinds.append(kind)
        offset += 12 + length
    assert kinds[:2] == [b"IHDR", b"iTXt"] and kinds[-1] == b"IEND"
    assert kinds.index(b"eXIf") < kinds.index(b"IDAT")


def test_png_text_outside_latin_1_is_kept() -> None:
    provenance = Provenance("job-1", "flux-schnell", "réfineur-☃", 7, TRAINED_ALGORITHMIC_MEDIA)

    data = encode_image(gradient(), OutputFormat.png, provenance)

    assert Image.open(io.BytesIO(data)).text["refinery:refiner"] == "réfineur-☃"
    assert read_provenance(data)["refiner"] == "réfineur-☃"


def test_lossy_formats_honour_quality() -> None:
    for fmt in (OutputFormat.jpeg, OutputFormat.webp):
        low = encode_image(gradient(), fmt, PROVENANCE, quality=10)
        high = encode_image(gradient(), fmt, PROVENANCE, quality=95)
        assert len(low) < len(high), fmt


def test_content_types_and_extensions_cover_every_format() -> None:
    assert CONTENT_TYPES[OutputFormat.jpeg] == "image/jpeg"
    assert [EXTENSIONS[fmt] for fmt in OutputFormat] == ["png", "webp", "jpg"]
    assert set(CONTENT_TYPES) == set(OutputFormat)


def test_read_provenance_of_a_plain_image_is_empty() -> None:
    assert read_provenance(save(gradient(), "PNG")) == {}


def test_read_provenance_refuses_an_xmp_packet_with_a_dtd() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'
    with pytest.raises(InvalidImage, match="DTD"):
        read_provenance(save(gradient(), "JPEG", xmp=bomb))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode: str) -> None:
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    if mode != "RGBA":
        image = image.convert(mode)

    decoded = decode_image(save(image, "PNG"), **LIMITS)

    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_palette_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 200, 10, 10])
    image.putpixel((0, 0), 0)

    decoded = decode_image(save(image, "PNG", transparency=0), **LIMITS)

    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (200, 10, 10)


def test_greyscale_comes_out_rgb() -> None:
    decoded = decode_image(save(Image.new("L", (32, 32), 77), "JPEG"), **LIMITS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == (77, 77, 77)


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    decoded = decode_image(save(Image.new("I;16", (32, 32), 0x8000), "PNG"), **LIMITS)
    assert decoded.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored rotated: display turned 90 degrees
    decoded = decode_image(save(gradient((64, 32)), "JPEG", exif=exif), **LIMITS)
    assert decoded.size == (32, 64)


def test_webp_input_is_accepted() -> None:
    assert decode_image(save(gradient(), "WEBP"), **LIMITS).size == (64, 48)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a PNG, JPEG or WebP"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a PNG, JPEG or WebP"),
    ],
)
def test_non_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImage, match=message) as caught:
        decode_image(data, **LIMITS)
    assert caught.value.field == "input"
    assert caught.value.code == "invalid_image"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused(fmt: str) -> None:
    with pytest.raises(InvalidImage, match="not a PNG, JPEG or WebP"):
        decode_image(save(gradient(), fmt), **LIMITS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_refused(fmt: str) -> None:
    data = save(gradient((256, 256)), fmt)

    with pytest.raises(InvalidImage, match="could not be decoded"):
        decode_image(data[: len(data) * 2 // 3], **LIMITS)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (100_000, 100_000, "too large to decode safely"),  # beyond PIL's hard limit
        (10_000, 10_000, "too large to decode safely"),  # inside PIL's warning band
        (5_000, 5_000, "declares 5000x5000"),  # below PIL's limits, above ours
    ],
)
def test_decompression_bombs_are_refused_from_the_header(width: int, height: int, message: str) -> None:
    data = png_declaring(width, height)
    assert len(data) < 100

    with pytest.raises(InvalidImage, match=message):
        decode_image(data, **LIMITS)


def test_crafted_header_is_parsed_as_declared() -> None:
    # Guards the bomb test: the crafted PNG must be a valid header, not a parse failure.
    assert Image.open(io.BytesIO(png_declaring(40, 30))).size == (40, 30)


def test_too_small_images_are_refused() -> None:
    with pytest.raises(InvalidImage, match="at least 16 px"):
        decode_image(save(Image.new("RGB", (1, 1)), "PNG"), **LIMITS)
    with pytest.raises(InvalidImage, match="at least 16 px"):
        decode_image(save(Image.new("RGB", (300, 15)), "PNG"), **LIMITS)


def test_too_many_bytes_are_refused_before_parsing() -> None:
    data = save(gradient(), "PNG")
    with pytest.raises(InvalidImage, match=f"is {len(data)} bytes"):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=LIMITS["max_pixels"])
