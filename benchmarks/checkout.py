"""Which deepspot_napari a benchmark measures: this checkout's when it is built in place
(tools/dev_build.sh), else the installed one (pip install .). A benchmark of an installed package that
is older than the checkout measures old code, so that case is said loudly on stderr."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_PACKAGE = ROOT / "deepspot_napari"


def import_package():
    """Imports deepspot_napari (the checkout's if built, else the installed one), says which on stderr and
    warns when the installed one lags the checkout's Python or C sources. Returns the module."""
    if any(CHECKOUT_PACKAGE.glob("_core.*")) and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import deepspot_napari
    where = Path(deepspot_napari.__file__).resolve().parent
    print(f"benchmarking deepspot_napari in {where}", file=sys.stderr)
    if where != CHECKOUT_PACKAGE:
        stale = [p.name for p in sorted(CHECKOUT_PACKAGE.glob("*.py"))
                 if not (where / p.name).is_file() or (where / p.name).read_bytes() != p.read_bytes()]
        core = next(where.glob("_core.*"), None)
        if core is not None and any(f.stat().st_mtime > core.stat().st_mtime for f in (ROOT / "csrc").iterdir()):
            stale.append("csrc/ (newer than the installed extension)")
        if stale:
            print(f"WARNING: the installed package differs from this checkout ({', '.join(stale)}): these numbers "
                  "are not the checkout's; run `pip install .` or tools/dev_build.sh first", file=sys.stderr)
    return deepspot_napari
