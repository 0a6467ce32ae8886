"""The shared decoding path: conversions to upright RGB and the reason of each refusal."""

import io

import numpy as np
import pytest
from PIL import Image

from model.preprocess import IMAGENET_MEAN, ImageDecodeError, decode_image, preprocess


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RED_TOP = np.zeros((40, 20, 3), np.uint8)
RED_TOP[:20, :, 0] = 255


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"hello, not an image", "unreadable"),
    (encode(Image.fromarray(RED_TOP), "JPEG")[:200], "unreadable"),
    (encode(Image.fromarray(RED_TOP), "ICO"), "unsupported_format"),
])
def test_refusals_name_their_reason(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == reason
    assert "object at 0x" not in str(info.value)  # no Python object reprs in client errors


def test_too_many_pixels_is_refused_before_decoding():
    data = encode(Image.new("L", (400, 300)), "PNG")
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=100_000)
    assert info.value.reason == "too_many_pixels"
    assert decode_image(data, max_pixels=120_000).size == (400, 300)


def test_exif_rotation_cmyk_16_bit_and_alpha_become_upright_rgb():
    upright = Image.fromarray(RED_TOP)
    rotated = upright.rotate(90, expand=True)  # stored sideways, EXIF says rotate back
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    got = decode_image(encode(rotated, "JPEG", exif=exif.tobytes(), quality=95))
    assert got.size == (20, 40) and np.asarray(got)[5, 10, 0] > 200  # red on top again

    cmyk = decode_image(encode(upright.convert("CMYK"), "JPEG", quality=95))
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[5, 10, 0] > 200

    ramp = np.linspace(0, 65535, 40 * 20).reshape(40, 20).astype(np.uint16)
    deep = decode_image(encode(Image.fromarray(ramp), "PNG"))
    assert deep.mode == "RGB"
    values = np.asarray(deep)[..., 0]
    assert values.min() == 0 and values.max() == 255  # scaled, not clipped to 255

    rgba = np.zeros((40, 20, 4), np.uint8)
    rgba[:20, :, 0] = 255
    rgba[:20, :, 3] = 255  # bottom half transparent
    flat = np.asarray(decode_image(encode(Image.fromarray(rgba), "PNG")))
    assert tuple(flat[30, 10]) == tuple(round(255 * m) for m in IMAGENET_MEAN)


def test_preprocess_resizes_and_normalises():
    arr = preprocess(Image.fromarray(RED_TOP), (16, 8))
    assert arr.shape == (3, 16, 8) and arr.dtype == np.float32
    assert arr[0, 0, 0] == pytest.approx((1.0 - 0.485) / 0.229, rel=1e-5)
    assert arr[1, 0, 0] == pytest.approx((0.0 - 0.456) / 0.224, rel=1e-5)
