"""Pictures for evaluation reports: a sample grid with one labelled row per class, a confusion
matrix heat map, the copy-detection scatter, and PNG helpers (atomic save, inline `data:` URIs).
Pillow draws the text and the scatter; torchvision's `make_grid` lays out the images."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

# Cells are upscaled (nearest neighbour) to at least this many pixels so that 32 px samples stay
# legible next to their labels.
MIN_CELL_PX = 64
PADDING_PX = 2
FONT_PX = 14


def _font(size: int = FONT_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def to_pil(images: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image; values are clamped before the uint8 cast."""
    array = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


def labelled_grid(images: torch.Tensor, class_names: list[str], per_class: int) -> Image.Image:
    """One row per class, `per_class` samples wide, the class name left of each row.

    Args:
        images: (len(class_names) * per_class, 3, H, W) float in [0, 1], grouped by class in the
            order of `class_names`.
        class_names: row labels.
        per_class: samples per row.

    Raises:
        ValueError: when the image count is not len(class_names) * per_class.
    """
    if images.ndim != 4 or len(images) != len(class_names) * per_class:
        raise ValueError(
            f"expected {len(class_names)} classes x {per_class} images, got shape {tuple(images.shape)}"
        )
    size = images.shape[-1]
    if size < MIN_CELL_PX:
        scale = -(-MIN_CELL_PX // size)
        images = F.interpolate(images.float(), scale_factor=scale, mode="nearest")
        size = images.shape[-1]
    grid = to_pil(make_grid(images, nrow=per_class, padding=PADDING_PX, pad_value=1.0))
    font = _font()
    margin = max(_text_width(name, font) for name in class_names) + 3 * PADDING_PX
    canvas = Image.new("RGB", (grid.width + margin, grid.height), "white")
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(class_names):
        centre_y = PADDING_PX + row * (size + PADDING_PX) + size // 2
        draw.text((PADDING_PX, centre_y), name, fill="black", font=font, anchor="lm")
    return canvas


def confusion_image(
    matrix: list[list[int]],
    class_names: list[str],
    cell_px: int = 40,
    columns: list[str] | None = None,
) -> Image.Image:
    """Heat map of a confusion matrix (rows = true class, columns = predicted), counts printed in
    each cell and each row shaded relative to its own total, so small classes stay readable.
    `columns` names the predicted classes when they differ from the rows' `class_names` (a judge
    with extra classes); default: the same."""
    columns = class_names if columns is None else columns
    font = _font(12)
    corner = "true \\ pred"
    label_w = max(_text_width(name, font) for name in [*class_names, *columns, corner]) + 8
    top = label_w  # column labels are drawn rotated, so they need the same room
    width, height = label_w + len(columns) * cell_px + 4, top + len(class_names) * cell_px + 4
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, row in enumerate(matrix):
        total = max(1, sum(row))
        for j, count in enumerate(row):
            shade = int(255 * (1 - count / total))
            box = (label_w + j * cell_px, top + i * cell_px)
            draw.rectangle(
                [box, (box[0] + cell_px - 1, box[1] + cell_px - 1)],
                fill=(shade, shade, 255),
                outline="grey",
            )
            colour = "white" if shade < 128 else "black"
            draw.text(
                (box[0] + cell_px / 2, box[1] + cell_px / 2),
                str(count),
                fill=colour,
                font=font,
                anchor="mm",
            )
        draw.text(
            (label_w - 4, top + i * cell_px + cell_px / 2), class_names[i], "black", font, "rm"
        )
    draw.text((2, 2), corner, fill="grey", font=font)
    for j, name in enumerate(columns):
        label = Image.new("RGB", (label_w, cell_px), "white")
        ImageDraw.Draw(label).text((4, cell_px / 2), name, fill="black", font=font, anchor="lm")
        image.paste(label.rotate(90, expand=True), (label_w + j * cell_px, 0))
    return image


def ratio_scatter(
    panels: list[tuple[str, torch.Tensor, torch.Tensor]], threshold: float, side_px: int = 240
) -> Image.Image:
    """The copy-detection figure: per panel (title, d1, d2), one dot per sample at x = d2 (second
    nearest training image), y = d1 (nearest), with the lines d1 = d2 and d1 = threshold * d2;
    dots under the threshold line (likely copies) are red. Axes start at 0, each panel scaled to
    its own largest distance."""
    font, margin = _font(12), 28
    canvas = Image.new("RGB", (len(panels) * (side_px + 2 * margin), side_px + 3 * margin), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (title, d1, d2) in enumerate(panels):
        x0, y0 = k * (side_px + 2 * margin) + margin, margin + side_px  # the plot's origin
        top = float(torch.cat([d1, d2]).max()) * 1.05 or 1.0
        draw.rectangle([x0, y0 - side_px, x0 + side_px, y0], outline="black")
        draw.line([x0, y0, x0 + side_px, y0 - side_px], fill="grey")
        draw.line([x0, y0, x0 + side_px, y0 - side_px * threshold], fill="red")
        for a, b in zip(d1.tolist(), d2.tolist(), strict=True):
            px, py = x0 + side_px * b / top, y0 - side_px * a / top
            colour = "red" if a < threshold * b else "royalblue"
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        flagged = int((d1 < threshold * d2).sum())
        draw.text((x0, margin / 2), f"{title}: {flagged}/{len(d1)} flagged", "black", font, "lm")
        draw.text((x0 + side_px / 2, y0 + margin / 2), f"d2 (0 to {top:.3g})", "black", font, "mm")
        note = f"y: d1 (nearest); red: d1 = {threshold:.3g} d2"
        draw.text((x0 + side_px / 2, y0 + margin * 1.5), note, "grey", font, "mm")
    return canvas


def save_png(image: Image.Image, path: Path) -> Path:
    """Write `image` as PNG via a temporary file in the same folder, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def png_data_uri(path: Path, max_side: int = 1024) -> str:
    """`data:image/png;base64,…` of the PNG at `path`, downscaled to `max_side` px at most so that
    an inline picture stays small enough for a Prefect artifact."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
