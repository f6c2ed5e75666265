"""What a review tool gives back, read into one shape whatever the tool: per reviewed image, the
boxes as the reviewer left them. The readers (`_fixes_labelstudio`, `_fixes_coco`) make it;
`_apply` matches it to the dataset."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Review", "ReviewedBox", "ReviewedImage"]


@dataclass(frozen=True)
class ReviewedBox:
    """A box as the reviewer left it.

    Attributes:
        label: its class, as the tool names it (the category's name, `class_labels`).
        box: ``[x, y, width, height]``: absolute pixels, or percent of the image's width and
            height when ``percent`` (Label Studio).
        annotation_id: the COCO annotation id it carries (None: a new box, or one the tool
            renumbered); used only where the ids can be trusted (`Review.ids_from_tool`).
        item: where it is in the fixes file, for messages (``task 3, region 'ann17'``).
    """

    label: str
    box: tuple[float, float, float, float]
    annotation_id: int | None
    item: str
    percent: bool = False


@dataclass(frozen=True)
class ReviewedImage:
    """One reviewed image: how the file names it (``image_id`` when the tool kept ours, else
    None; ``file_name`` as it wrote it), its size in the file (None if unknown), its boxes."""

    image_id: int | None
    file_name: str | None
    size: tuple[int, int] | None
    boxes: tuple[ReviewedBox, ...]
    item: str


@dataclass(frozen=True)
class Review:
    """A fixes file, read.

    Attributes:
        path: the file (for messages).
        format: ``labelstudio`` or ``coco``.
        images: the reviewed images; an image the file does not hold was not reviewed.
        ids_from_tool: ``"ours"`` when annotation ids are kfold-ray's own (Label Studio region
            ids ``ann<id>``), ``"maybe"`` when they may have been renumbered (a COCO file: CVAT
            and FiftyOne write their own), which `_apply` checks before it trusts them.
    """

    path: str
    format: str
    images: tuple[ReviewedImage, ...]
    ids_from_tool: str
