"""Decoding untrusted input images and encoding results with their provenance.

Inputs come from callers (inline uploads, S3 objects), so decoding is defensive: sizes are
checked from the header before any pixel is decoded, and a file that does not decode
completely is refused rather than silently padded. Every output carries an XMP packet with
the IPTC digital source type, so anyone can tell it is AI-generated or AI-enhanced.

PNG pixels are compressed by fpng, about 50 times cheaper in CPU than Pillow's writer for
files about a tenth larger (README, "Dependencies and why"): a worker encodes every result,
so that CPU would otherwise cap the GPU. Pillow writes WebP and JPEG.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

import fpng
from PIL import ExifTags, Image, ImageOps

from shared.contract import OutputFormat
from shared.errors import InvalidImage

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ALGORITHMICALLY_ENHANCED = "http://cv.iptc.org/newscodes/digitalsourcetype/algorithmicallyEnhanced"

SOFTWARE = "face-refinery"
CONTENT_TYPES: dict[OutputFormat, str] = {
    OutputFormat.png: "image/png",
    OutputFormat.webp: "image/webp",
    OutputFormat.jpeg: "image/jpeg",
}
EXTENSIONS: dict[OutputFormat, str] = {
    OutputFormat.png: "png",
    OutputFormat.webp: "webp",
    OutputFormat.jpeg: "jpg",
}

# Only these plugins may parse input: fewer parsers, less attack surface.
_INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
_PIL_FORMATS = {OutputFormat.webp: "WEBP", OutputFormat.jpeg: "JPEG"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = len(_PNG_SIGNATURE) + 4 + 4 + 13 + 4  # length, type, data, CRC

_NS_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_NS_REFINERY = "https://github.com/face-refinery/ns/1.0/"
_NS_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
# read_provenance key -> XMP property, as ElementTree spells qualified names.
_XMP_FIELDS = {
    "job_id": f"{{{_NS_REFINERY}}}job_id",
    "generator": f"{{{_NS_REFINERY}}}generator",
    "refiner": f"{{{_NS_REFINERY}}}refiner",
    "seed": f"{{{_NS_REFINERY}}}seed",
    "digital_source_type": f"{{{_NS_IPTC_EXT}}}DigitalSourceType",
}


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int = 16) -> Image.Image:
    """Decode a PNG, JPEG or WebP into an upright RGB image, or raise ``InvalidImage``."""
    if not data:
        raise InvalidImage("is empty", field="input")
    if len(data) > max_bytes:
        raise InvalidImage(f"is {len(data)} bytes; the limit is {max_bytes}", field="input")
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make it an error too.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=_INPUT_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"is too large to decode safely: {exc}", field="input") from None
    except Exception:
        raise InvalidImage("is not a PNG, JPEG or WebP image", field="input") from None

    # Image.open only read the header: refuse by declared size before decoding any pixel.
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImage(
            f"declares {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
            field="input",
        )
    if min(width, height) < min_side:
        raise InvalidImage(f"is {width}x{height}; each side must be at least {min_side} px", field="input")

    try:
        # load() raises on truncated data as long as ImageFile.LOAD_TRUNCATED_IMAGES is
        # False, which this module never changes. A corrupt stream can make a decoder raise
        # almost any exception type; all of them mean the same thing here.
        image.load()
        # Phone photos are often stored sideways with an EXIF orientation tag. In place:
        # otherwise it copies even an upright image.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:
        raise InvalidImage(f"could not be decoded ({image.format}): {exc}", field="input") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):
        # 16-bit greyscale PNG: a plain convert() would clip everything above 255 to white.
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if image.has_transparency_data:
        # Composite on white: dropping alpha would expose whatever colour hid under it.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    # convert() copies even an RGB image: a needless 3 MB per 1024x1024 image.
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class Provenance:
    job_id: str
    generator: str | None  # the preset that generated the image; None for refine-only
    refiner: str
    seed: int | None
    digital_source_type: str  # TRAINED_ALGORITHMIC_MEDIA or ALGORITHMICALLY_ENHANCED


def encode_image(image: Image.Image, fmt: OutputFormat, provenance: Provenance, *, quality: int = 95) -> bytes:
    """Encode with the provenance in XMP (all formats), EXIF and, for PNG, text chunks."""
    image = _to_rgb(image)
    xmp = _xmp_packet(provenance)
    exif = Image.Exif()
    exif[ExifTags.Base.Software] = SOFTWARE
    exif[ExifTags.Base.ImageDescription] = (
        f"{SOFTWARE} job {provenance.job_id}: {provenance.digital_source_type.rsplit('/', 1)[-1]}"
    )
    if fmt is OutputFormat.png:
        return _png(image, xmp, exif, provenance)
    options: dict[str, object] = {"exif": exif}
    if fmt is OutputFormat.jpeg:
        # 4:4:4: chroma subsampling smears skin tones and the edges of lips and eyes. No
        # Huffman optimisation: the same pixels in ~9% fewer bytes for ~3x the CPU per image
        # (benchmarks/results/ceiling.json).
        options.update(xmp=xmp, quality=quality, subsampling=0)
    else:
        options.update(xmp=xmp, quality=quality, method=4)
    out = io.BytesIO()
    image.save(out, _PIL_FORMATS[fmt], **options)
    return out.getvalue()


def _png(image: Image.Image, xmp: bytes, exif: Image.Exif, provenance: Provenance) -> bytes:
    """fpng's pixels with the metadata chunks Pillow would write, placed right after IHDR
    (before the pixels, where readers that stop early still find them)."""
    data = fpng.from_bytes(image.tobytes(), image.width, image.height, 3)
    # fpng returns empty bytes rather than raising when it fails.
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise RuntimeError(f"fpng could not encode a {image.width}x{image.height} image")
    # The XMP convention is this iTXt key, uncompressed so that tools scanning for the
    # packet find it: keyword, then compression flag and method, language and translated
    # keyword, all empty.
    chunks = [_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp), _text_chunk("Software", SOFTWARE)]
    chunks += [_text_chunk(f"refinery:{key}", value) for key, value in _fields(provenance).items()]
    chunks.append(_chunk(b"eXIf", exif.tobytes(8).removeprefix(b"Exif\0\0")))
    return b"".join([data[:_IHDR_END], *chunks, data[_IHDR_END:]])


def _text_chunk(key: str, value: str) -> bytes:
    """tEXt where Latin-1 can hold the value, else uncompressed iTXt (UTF-8), as Pillow does."""
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode())


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _fields(provenance: Provenance) -> dict[str, str]:
    """The face-refinery fields; unknown values (no generator, no seed) are left out."""
    fields = {
        "job_id": provenance.job_id,
        "generator": provenance.generator,
        "refiner": provenance.refiner,
        "seed": None if provenance.seed is None else str(provenance.seed),
    }
    return {key: value for key, value in fields.items() if value is not None}


def _xmp_packet(provenance: Provenance) -> bytes:
    attributes = "".join(f"\n    refinery:{key}={quoteattr(value)}" for key, value in _fields(provenance).items())
    return f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="{_NS_RDF}">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:Iptc4xmpExt="{_NS_IPTC_EXT}"
    xmlns:refinery="{_NS_REFINERY}"
    xmp:CreatorTool={quoteattr(SOFTWARE)}
    Iptc4xmpExt:DigitalSourceType={quoteattr(provenance.digital_source_type)}{attributes}/>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="r"?>""".encode()


def read_provenance(data: bytes) -> dict[str, str]:
    """The provenance in a PNG, JPEG or WebP's XMP packet; {} when it has none.

    All five keys are present when a packet is; a value the packet lacks (a refine-only
    job has no generator or seed) is "".
    """
    try:
        with Image.open(io.BytesIO(data), formats=_INPUT_FORMATS) as image:
            packet = image.info.get("xmp")
    except Exception:
        raise InvalidImage("is not a PNG, JPEG or WebP image", field="input") from None
    if not packet:
        return {}
    # The standard library's XML parser expands entities declared in a DTD; an XMP packet
    # never needs one, so refuse rather than parse one (entity expansion bombs).
    if b"<!DOCTYPE" in packet:
        raise InvalidImage("carries an XMP packet with a DTD", field="input")
    try:
        root = ElementTree.fromstring(packet.rstrip(b"\x00 "))
    except ElementTree.ParseError as exc:
        raise InvalidImage(f"carries a malformed XMP packet: {exc}", field="input") from None
    # Other tools may rewrite attributes as child elements; accept both RDF spellings.
    values: dict[str, str] = {}
    for description in root.iter(f"{{{_NS_RDF}}}Description"):
        values.update(description.attrib)
        values.update({child.tag: (child.text or "").strip() for child in description})
    return {key: values.get(qname, "") for key, qname in _XMP_FIELDS.items()}
