"""Validating a COCO dataset before anything is reserved: every problem, one line each, naming
the file, the field and the id.

In: the json's bytes and the image files. Out: parsed tables (numpy) or a `DatasetError`.

    _json         the document, its categories, images and annotations (boxes inside their image)
    _image_table  the parsed images, shared by the checks below
    _files        each image file: present, readable, of the size the json says (JPEG headers)
    _jpeg         JPEG markers read without decoding: size, orientation, truncation
    _masks        polygons and RLEs against their image
    _problems     collecting problems and writing them as lines
"""
