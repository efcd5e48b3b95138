"""Nothing on the board keeps a quantity in a float.

An ESP32's floats are single precision: a total kept in one is exact only to 2**24 (ESPHome's
pulse-meter total drifts that way). The firmware holds counts, registers and times as integers and
takes a float only from a config value it converts once (the K-factor to whole millilitres), so
its source has no float literal and no true division (`/`; `//` is integer division)."""

import ast
from pathlib import Path

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"


def float_uses(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, float):
            yield node.lineno, f"float literal {node.value!r}"
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, ast.Div):
            yield node.lineno, "true division (/)"
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "float":
            yield node.lineno, "float()"


def test_the_firmware_has_no_float_arithmetic():
    found = [f"{p.relative_to(FIRMWARE.parent)}:{line}: {what}"
             for p in sorted(FIRMWARE.rglob("*.py")) for line, what in float_uses(p)]
    assert not found, "keep board quantities in integers (scale them, e.g. mL, us):\n" + "\n".join(found)


def test_the_check_finds_a_float_total(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("total = 0.0\ndef add(litres):\n    global total\n    total += litres / 2\n")
    assert [what for _line, what in float_uses(bad)] == ["float literal 0.0", "true division (/)"]
