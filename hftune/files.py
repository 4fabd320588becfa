"""What is wrong with a recipe or data file, found before a library fails deep inside reading it:
the first line that is not UTF-8 (and how to convert it), the first CSV row with too many fields."""

import codecs
import csv

BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"))


def not_utf8(label, path):
    """`label 'path' is not valid UTF-8: ...; re-encode ...` for the first bad line, or None when the file is UTF-8.
    A UTF-16/32 byte-order mark names that encoding in the iconv hint; otherwise latin1 is the usual source."""
    with open(path, "rb") as handle:
        start = handle.read(4)
        for bom, name in BOMS:
            if start.startswith(bom):
                return f"{label} '{path}' is {name.upper()}, not UTF-8; convert it (e.g. iconv -f {name} -t utf-8)."
        handle.seek(0)
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"{label} '{path}' is not valid UTF-8: line {number} has byte 0x{line[err.start]:02x}; "
                        "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8).")
    return None


def ragged_row(label, path, delimiter=","):
    """The first CSV row with more fields than the header, as a message (None when there is none):
    pandas would read the surplus leading fields as an index and shift every column of the file."""
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        rows = csv.reader(handle, delimiter=delimiter)
        header = next(rows, [])
        for number, row in enumerate(rows, start=2):
            if len(row) > len(header):
                return (f"{label} '{path}': row {number} has {len(row)} fields, the header {len(header)} "
                        f"({', '.join(header)}); quote fields that hold a '{delimiter}' or fix the row.")
    return None
