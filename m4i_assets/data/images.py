"""Where a record's image lives and how every loader opens it: one function, `open_rgb`.

An `image_uri` is a local file path, or a member of an uncompressed tar shard addressed by byte range
(`tar:///abs/shard.tar?member=key.jpg&offset=1536&size=4096`): a WebDataset image is read with one seek,
without extracting the shard or indexing it again.

Usable-but-odd images are normalised here, not rejected: grayscale, palette, CMYK and alpha images
become RGB; 16- and 32-bit integer images are rescaled to 8 bits (a plain `convert("RGB")` would clip
them to white).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, urlencode, urlparse

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

TAR_SCHEME = "tar"


def tar_member_uri(shard: str | Path, member: str, offset: int, size: int) -> str:
    """The `image_uri` of a tar member whose data starts at byte `offset` and is `size` bytes long."""
    query = urlencode({"member": member, "offset": offset, "size": size})
    return f"{TAR_SCHEME}://{quote(str(Path(shard).resolve()))}?{query}"


def read_image_bytes(uri: str) -> bytes:
    """The encoded bytes behind an `image_uri` (a file path or a tar member URI)."""
    if not uri.startswith(f"{TAR_SCHEME}://"):
        return Path(uri).read_bytes()
    parsed = urlparse(uri)
    query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    offset, size = int(query["offset"]), int(query["size"])
    with open(parsed.path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise OSError(f"{parsed.path}: member {query.get('member')} is truncated ({len(data)} of {size} bytes)")
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB (integer images of more than 8 bits are rescaled, not clipped)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else float(array.max())
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # alpha composited on white
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def open_rgb(uri: str) -> Image.Image:
    """Decode the image behind `uri` as RGB (fully loaded, file closed)."""
    if uri.startswith(f"{TAR_SCHEME}://"):
        with Image.open(io.BytesIO(read_image_bytes(uri))) as image:
            return to_rgb(image)
    with Image.open(uri) as image:
        return to_rgb(image)


def load_image_tensor(uris: list[str], size: int) -> torch.Tensor:
    """Images as float tensors in [0, 1], resized to `size` (bicubic), channels first (n, 3, size, size): the
    pixels of the captioners and the M^4I feature extractor."""
    import torch  # imported here: reading records and manifests needs no torch

    arrays = []
    for uri in uris:
        rgb = open_rgb(uri).resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(rgb, dtype=np.float32) / 255)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
