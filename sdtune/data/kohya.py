"""kohya sd-scripts ``dataset_config`` TOML -> sdtune's [data] table, so kohya users bring their datasets unchanged.

    [general]                      ->  defaults for every dataset and subset
    [[datasets]]                   ->  [data] (sdtune trains one resolution: several datasets must agree)
    [[datasets.subsets]]           ->  [[data.subsets]]

Every key kohya documents that sdtune has is mapped (``SUBSET_KEYS``, ``DATASET_KEYS``), with kohya's defaults
(buckets off unless ``enable_bucket``, upscaling allowed unless ``bucket_no_upscale``, captions in
``.caption`` files); any other key is refused
by name, so nothing in the user's file is silently dropped. Relative ``image_dir``s are relative to the file's
folder.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class KohyaDatasetError(ValueError):
    """A kohya dataset_config that sdtune cannot map; the message names the key."""


# kohya subset key -> [[data.subsets]] key (value passed through or converted)
SUBSET_KEYS = {
    "image_dir": ("dir", None),
    "num_repeats": ("repeats", None),
    "is_reg": ("is_reg", None),
    "class_tokens": ("prompt", None),
    "caption_extension": ("caption_ext", lambda v: v if v.startswith(".") else "." + v),
    "keep_tokens": ("keep_tags", None),
    "shuffle_caption": ("shuffle_tags", None),
    "caption_dropout_rate": ("caption_dropout", None),
    "caption_tag_dropout_rate": ("tag_dropout", None),
    "caption_prefix": ("trigger_word", lambda v: v.strip().rstrip(",").strip()),
    "alpha_mask": ("alpha_mask", None),
    "conditioning_data_dir": ("mask_dir", None),  # kohya's masked_loss reads its masks from here
}
# kohya keys that are one setting for the whole run in sdtune: -> [data] key
GLOBAL_KEYS = {
    "resolution": ("resolution", None),
    "enable_bucket": ("buckets", None),
    "min_bucket_reso": ("bucket_min_side", None),
    "max_bucket_reso": ("bucket_max_side", None),
    "bucket_reso_steps": ("bucket_step", None),
    "bucket_no_upscale": ("bucket_upscale", lambda v: not v),
    "flip_aug": ("flip", None),
    "random_crop": ("crop", lambda v: "random" if v else "center"),
    "caption_separator": ("tag_separator", None),
}
# keys of other sections of sdtune's config: refused with the key to set instead
ELSEWHERE = {"batch_size": "train.batch_size", "cache_latents": "data.cache_latents",
             "cache_latents_to_disk": "data.latent_cache_dir"}
KOHYA_DEFAULTS = {"buckets": False, "bucket_upscale": True, "caption_ext": ".caption"}


def _map(table: dict, where: str, keys: dict, out: dict, path: Path) -> None:
    for key, value in table.items():
        if key in ("datasets", "subsets"):
            continue
        if key in ELSEWHERE:
            raise KohyaDatasetError(f"{path}: {where} {key}: set {ELSEWHERE[key]} in the sdtune config instead")
        if key not in keys:
            known = sorted({*SUBSET_KEYS, *GLOBAL_KEYS})
            raise KohyaDatasetError(f"{path}: {where} {key} is not supported by sdtune (supported: {', '.join(known)})")
        name, convert = keys[key]
        out[name] = convert(value) if convert else value


def _resolution(value, path: Path) -> int:
    if isinstance(value, list):
        if len(value) != 2 or value[0] != value[1]:
            raise KohyaDatasetError(f"{path}: resolution {value}: sdtune trains buckets of about resolution² pixels; "
                                    f"give one number (or [n, n])")
        value = value[0]
    return value


def to_data_table(path: str | Path, resolve_paths: Callable[[dict, Path], None]) -> dict:
    """The [data] table (with ``subsets``) that a kohya dataset_config file means. ``resolve_paths(subset, folder)``
    makes a subset's relative folders relative to the file's folder (the schema's rule, ``config.resolve_input_paths``)."""
    path = Path(path)
    if not path.is_file():
        raise KohyaDatasetError(f"kohya dataset_config not found: {path}")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise KohyaDatasetError(f"{path}: not valid TOML: {e}") from None
    for key in d:
        if key not in ("general", "datasets"):
            raise KohyaDatasetError(f"{path}: [{key}] is not a kohya dataset_config section (general, datasets)")
    every = {**SUBSET_KEYS, **GLOBAL_KEYS}
    general: dict = {}
    _map(d.get("general", {}), "[general]", every, general, path)
    data = dict(KOHYA_DEFAULTS)
    seen: dict = {}
    subsets = []
    datasets = d.get("datasets", [])
    if not datasets:
        raise KohyaDatasetError(f"{path}: no [[datasets]]")
    for i, ds in enumerate(datasets):
        mapped = dict(general)
        _map(ds, f"[[datasets]] {i}", every, mapped, path)
        if not ds.get("subsets"):
            raise KohyaDatasetError(f"{path}: [[datasets]] {i} has no [[datasets.subsets]]")
        for j, sub in enumerate(ds["subsets"]):
            one = dict(mapped)
            _map(sub, f"[[datasets.subsets]] {i}.{j}", every, one, path)
            for name, _ in GLOBAL_KEYS.values():  # one value for the whole run
                if name in one:
                    value = _resolution(one.pop(name), path) if name == "resolution" else one.pop(name)
                    if seen.setdefault(name, value) != value:
                        raise KohyaDatasetError(f"{path}: the datasets disagree on {name} ({seen[name]!r} and "
                                                f"{value!r}); sdtune trains one value for the whole run")
                    data[name] = value
            if "dir" not in one:
                raise KohyaDatasetError(f"{path}: [[datasets.subsets]] {i}.{j} has no image_dir")
            resolve_paths(one, path.resolve().parent)
            subsets.append(one)
    data["subsets"] = subsets
    return data


def merge(data: dict, resolve_paths: Callable[[dict, Path], None]) -> dict:
    """A [data] table whose ``dataset_config`` names a kohya file: the file's mapping, overridden by the keys
    written in [data] itself (and its subsets appended after the file's)."""
    mapped = to_data_table(data["dataset_config"], resolve_paths)
    # the file is replaced by what it means, so that the run's recorded config.toml stands alone
    out = {**mapped, **{k: v for k, v in data.items() if k not in ("subsets", "dataset_config")}}
    out["subsets"] = mapped["subsets"] + list(data.get("subsets", []))
    return out
