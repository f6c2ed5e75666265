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
        annotation_id: the annotation id it carries (None: a new box).
        id_is_ours: the id is the dataset's for sure (a Label Studio region ``ann<id>``, a
            FiftyOne ``coco_id``); else it may be the tool's own numbering, which `_apply`
            checks before it trusts it.
        item: where it is in the fixes file, for messages (``task 3, region 'ann17'``).
        percent: ``box`` is in percent of the image (Label Studio), else in pixels.
    """

    label: str
    box: tuple[float, float, float, float]
    annotation_id: int | None
    item: str
    percent: bool = False
    id_is_ours: bool = False


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
    """

    path: str
    format: str
    images: tuple[ReviewedImage, ...]
