"""The fast chat path's image encoder (tower blocks through one compiled function) equals encode_images."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from axolotl_minicpmv.inference.fast_vision import image_encoder

SIZES = [(1, 448, 448), (6, 448, 448), (1, 364, 546), (5, 378, 532)]  # (images, height, width)


def _pixels(n: int, height: int, width: int) -> torch.Tensor:
    return torch.rand((n, 3, height, width), generator=torch.Generator().manual_seed(height * width + n)) * 2 - 1


def test_uncompiled_encoder_is_encode_images(tiny_model):
    encode = image_encoder(tiny_model, compile_blocks=False)
    with torch.inference_mode():
        for size in SIZES:
            assert torch.equal(encode(_pixels(*size)), tiny_model.encode_images(_pixels(*size)))


@pytest.mark.filterwarnings("ignore")
def test_compiled_blocks_serve_every_image_size(tiny_model):
    torch._dynamo.reset()
    encode = image_encoder(tiny_model, compile_blocks=True)
    graphs = []
    with torch.inference_mode():
        for size in SIZES:
            before = counters["stats"]["unique_graphs"]
            torch.testing.assert_close(encode(_pixels(*size)), tiny_model.encode_images(_pixels(*size)), rtol=1e-4, atol=1e-4)
            graphs.append(counters["stats"]["unique_graphs"] - before)
    # One graph for a single image, one more once the batch varies; later sizes and all blocks reuse them.
    assert graphs == [1, 1, 0, 0], graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
def test_graphed_encoder_replays_encode_images(tiny_model):
    model = tiny_model.to("cuda")
    try:
        encode = image_encoder(model, compile_blocks=False, cuda_graphs=True)
        graphs = encode.graphed._graphs
        with torch.inference_mode():
            for size in SIZES:  # a shape's first call runs directly, nothing recorded
                pixels = _pixels(*size).cuda()
                assert torch.equal(encode(pixels), model.encode_images(pixels))
            assert not graphs
            for size in SIZES + SIZES[:2]:  # the second call records, the third replays
                pixels = _pixels(*size).cuda()
                assert torch.equal(encode(pixels), model.encode_images(pixels))
            assert len(graphs) == len(SIZES)
    finally:
        tiny_model.to("cpu")
