"""The generated code of the synthetic app (synthetic.py): `python codegen.py DIR` writes the
package `synthetic_code` under DIR, one module per MODULES, and compiles it to .pyc, so that
the app's imports unmarshal code objects the way real imports do.

Each module holds CLASSES classes of METHODS methods (a loop, a branch, a string each), a
handler per class, and a few constants: about 25 MB of code objects, functions, class
dictionaries and strings for the 180 modules of $SYNTHETIC_MB=100.
"""
from __future__ import annotations

import compileall
import os
import sys
from pathlib import Path

SCALE = float(os.environ.get("SYNTHETIC_MB", "100")) / 100
MODULES = max(1, int(180 * SCALE))
CLASSES, METHODS = 12, 8


def module_source(i: int) -> str:
    lines = [f'"""Generated module {i}."""', f"TABLE = {tuple(range(i, i + 40))!r}",
             f"NAMES = {tuple(f'name-{i}-{k}' for k in range(20))!r}"]
    for k in range(CLASSES):
        lines += [f"class Model{k}:", f'    """Model {k} of module {i}: some fields and methods."""',
                  f"    kind = 'model-{i}-{k}'", f"    limits = {{'low': {k}, 'high': {k * 10 + i}}}"]
        for m in range(METHODS):
            lines += [f"    def method_{m}(self, x, y={m}):",
                      f'        """Method {m}: a loop, a branch, a string."""',
                      "        total = x",
                      "        for v in range(y):",
                      f"            total += v * {m + 1} + len(self.kind)",
                      f"        if total > {1000 + m * k}:",
                      f"            return 'big-{i}-{k}-{m}:' + str(total)",
                      f"        return total + TABLE[{m} % len(TABLE)]"]
        lines += [f"def handler_{k}(n):", f"    obj = Model{k}()",
                  f"    return [getattr(obj, 'method_' + str(m))(n) for m in range({METHODS})]"]
    return "\n".join(lines) + "\n"


def generate(directory: str | os.PathLike) -> Path:
    package = Path(directory) / "synthetic_code"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""Generated modules of the synthetic app."""\n')
    for i in range(MODULES):
        (package / f"m{i:04d}.py").write_text(module_source(i))
    if not compileall.compile_dir(str(package), quiet=1):
        raise RuntimeError(f"cannot compile the generated modules in {package}")
    return package


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python codegen.py DIR   (writes DIR/synthetic_code and its .pyc files)")
    print(generate(sys.argv[1]))
