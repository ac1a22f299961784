"""Where the package's own data lives: the embedded models, the judge, the demo images and the recipes.

Everything the main job needs at run time ships inside the package (``sdtune/assets``, ``sdtune/recipes``), so an
installed wheel behaves as a checkout does; in a checkout, ``assets/`` and ``train_configs/`` link to the same folders.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

ASSETS = Path(str(files("sdtune") / "assets"))
RECIPES = Path(str(files("sdtune") / "recipes"))


def recipes() -> dict[str, Path]:
    """Packaged recipe name (file stem, e.g. ``demo``) -> its TOML file."""
    return {p.stem: p for p in sorted(RECIPES.glob("*.toml"))}


def recipe_path(name_or_path: str | Path) -> Path:
    """A config file as given, or the packaged recipe of that name (``demo`` -> ``sdtune/recipes/demo.toml``).

    Raises FileNotFoundError naming the packaged recipes when it is neither.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    found = recipes().get(str(name_or_path).removesuffix(".toml"))
    if found is not None and path.parent == Path("."):
        return found
    raise FileNotFoundError(f"config not found: {name_or_path} (a TOML file, or a packaged recipe: "
                            f"{', '.join(recipes())})")
