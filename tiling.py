"""
Image splitting, the Idefics3 (SmolVLM) way: one image -> tiles the tower's size plus a global view

    Tiler(image_size, max_image_size, resample)(image) -> (tiles uint8 (n, S, S, 3), (rows, cols))

The rules are those of transformers' Idefics3ImageProcessor with do_image_splitting=True, so that an Idefics3
export (export.py) tiles every image exactly as glimpse did in training:
  1. resize the image so its longest edge is max_image_size, keeping the aspect ratio (the other edge rounded
     down, then up to even; images smaller than that are scaled up);
  2. resize it again so that each edge is a multiple of image_size (the width first when it is the longer edge);
  3. cut it into rows x cols tiles of image_size, row by row, and add the whole image resized to image_size
     last (the global view). An image that step 2 leaves at image_size x image_size is not split: rows =
     cols = 0 and the image is its own global view.
Every resize is torchvision's on uint8 pixels, as the processor's torchvision backend does it.
tests/test_tiling.py checks the sizes, the tiles and the pixels against the processor itself.
The token layout of a split image (tile markers, newlines) is the tokenizer's: tokenizer.image_run.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

MAX_GRID = 6  # Idefics3's tile markers go up to <row_6_col_6>


def longest_edge_size(height, width, longest):
    """Step 1: (height, width) with the longest edge at `longest`, the other rounded down, then up to even."""
    if width >= height:
        h = int(longest / (width / height))
        return max(h + h % 2, 1), longest
    w = int(longest * (width / height))
    return longest, max(w + w % 2, 1)


def encoder_multiple_size(height, width, tile):
    """Step 2: (height, width) rounded up to multiples of tile, the longer edge first, as the processor does."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def max_grid(image_size, max_image_size):
    """The most tiles along an edge that an image can be split into."""
    return math.ceil(max_image_size / image_size)


def resize(x, size, resample):
    """uint8 (B, 3, H, W) -> uint8 (B, 3, h, w), with torchvision's antialiased kernel (the processors' resize)."""
    from torchvision.transforms.v2 import InterpolationMode, functional
    mode = {'bicubic': InterpolationMode.BICUBIC, 'bilinear': InterpolationMode.BILINEAR,
            'lanczos': InterpolationMode.LANCZOS}[resample]  # lanczos: llama.cpp's for Idefics3 (CPU only)
    return functional.resize(x, list(size), interpolation=mode, antialias=True)


@dataclass(frozen=True)
class Tiler:
    """Splits images for a model whose tower takes image_size x image_size; picklable, for DataLoader workers."""
    image_size: int
    max_image_size: int
    resample: str = 'bicubic'

    def grid(self, height, width):
        """(rows, cols) of an image of this size; (0, 0) when it is not split."""
        h, w = encoder_multiple_size(*longest_edge_size(height, width, self.max_image_size), self.image_size)
        return (0, 0) if (h, w) == (self.image_size, self.image_size) else (h // self.image_size, w // self.image_size)

    def __call__(self, image):
        """An image, uint8 (H, W, 3) array or tensor -> (tiles uint8 tensor (rows * cols + 1, S, S, 3), (rows, cols))."""
        x = (image if torch.is_tensor(image) else torch.from_numpy(np.array(image))).cpu().permute(2, 0, 1)[None]
        S = self.image_size
        x = resize(x, longest_edge_size(x.shape[2], x.shape[3], self.max_image_size), self.resample)
        x = resize(x, encoder_multiple_size(x.shape[2], x.shape[3], S), self.resample)
        rows, cols = x.shape[2] // S, x.shape[3] // S
        if (rows, cols) == (1, 1):
            return x.permute(0, 2, 3, 1).contiguous(), (0, 0)
        tiles = x[0].unfold(1, S, S).unfold(2, S, S)  # (3, rows, cols, S, S)
        tiles = tiles.permute(1, 2, 3, 4, 0).reshape(rows * cols, S, S, 3)
        whole = resize(x, (S, S), self.resample).permute(0, 2, 3, 1)
        return torch.cat([tiles, whole]).contiguous(), (rows, cols)

    def split(self, images):
        """Several images -> (all their tiles, one image after another, (n, S, S, 3); [(rows, cols) per image])."""
        out = [self(im) for im in images]
        return torch.cat([t for t, _ in out]), [g for _, g in out]
