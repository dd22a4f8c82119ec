"""DatasetSpec validation and version ids, the reading side (load_ref, open_split), and exact
counts on the real shared archives (oxford-pets-mini and PetImages) served over HTTP from
127.0.0.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import OXFORD_MINI, PETIMAGES
from pydantic import ValidationError

from data.dataset import (
    KNOWN_CHECKSUMS,
    OFFICIAL_OXFORD_URL,
    DatasetRef,
    DatasetSpec,
    load_ref,
    open_split,
    read_manifest,
    verify_files,
)
from data.download import ensure
from data.errors import PermanentError

# From ../shared/datasets/README.md.
OXFORD_MINI_SHA256 = "5e323a073ce0e71fda305108a81efefa0abf20074e647cb6143273b4221b4229"
PETIMAGES_SHA256 = "8bbd2356c185cce16913e0db65c3c06162824687d9faae6487f69551adc79639"
CAT_BREEDS = [
    "Abyssinian",
    "Bengal",
    "Birman",
    "Bombay",
    "British_Shorthair",
    "Egyptian_Mau",
    "Maine_Coon",
    "Persian",
    "Ragdoll",
    "Russian_Blue",
    "Siamese",
    "Sphynx",
]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"checksum": "md5:1234"}, "32 hex digits"),
        ({"checksum": "crc32:deadbeef"}, "ALGO:HEX"),
        ({"source": "ftp://example.org/x.zip"}, "unsupported source scheme"),
        ({"labels": "species", "max_other": 0}, "needs the 'other' class"),
        ({"image_sizes": []}, "at least 1"),
        ({"image_sizes": [4]}, "greater than or equal to 8"),
        ({"val_fraction": 0.0}, "greater than 0"),
        ({"max_other": -1}, "greater than or equal to 0"),
        ({"labels": "dog"}, "'breed' or 'species'"),
        ({"max_member_mib": 0}, "greater than or equal to 1"),
        ({"max_member_mib": 4096}, "less than or equal to 1024"),
    ],
)
def test_bad_specs_are_rejected_with_the_field_named(fields, message):
    with pytest.raises(ValidationError, match=message):
        DatasetSpec(**fields)


def test_official_source_has_its_checksum_built_in():
    spec = DatasetSpec()
    assert spec.source == OFFICIAL_OXFORD_URL
    assert spec.expected_checksum == KNOWN_CHECKSUMS[OFFICIAL_OXFORD_URL]
    assert spec.version_id().startswith("oxford-pets-breed-")
    assert DatasetSpec(checksum="SHA256:" + "A" * 64).checksum == "sha256:" + "a" * 64


def test_version_id_covers_every_field_that_changes_the_output(tmp_path):
    base = DatasetSpec(source=str(tmp_path / "a.zip"), image_sizes=[32, 64])
    assert (
        base.version_id()
        == DatasetSpec(source=str(tmp_path / "a.zip"), image_sizes=[64, 32, 64]).version_id()
    )
    assert (
        base.version_id()
        == DatasetSpec(source=(tmp_path / "a.zip").as_uri(), image_sizes=[32, 64]).version_id()
    )
    variants = [
        {"source": str(tmp_path / "b.zip")},
        {"checksum": "md5:" + "1" * 32},
        {"labels": "species"},
        {"image_sizes": [32]},
        {"max_other": 10},
        {"val_fraction": 0.2},
        {"seed": 1},
        {"max_member_mib": 64},
    ]
    ids = {base.model_copy(update=v).version_id() for v in variants} | {base.version_id()}
    assert len(ids) == len(variants) + 1


def test_oxford_mini_breed_counts_are_exact(http_server, tmp_path):
    url = http_server.add("/pets/images.tar.gz", OXFORD_MINI)
    spec = DatasetSpec(source=url, checksum=f"sha256:{OXFORD_MINI_SHA256}", image_sizes=[16])
    ref = ensure(spec, tmp_path / "data", workers=2)
    assert http_server.count("/pets/images.tar.gz") == 1
    assert ref.label_mode == "breed"
    assert ref.classes == [*CAT_BREEDS, "other"]
    assert ref.counts == {**dict.fromkeys(CAT_BREEDS, 10), "other": 250}
    manifest = read_manifest(Path(ref.root))
    assert manifest.layout == "oxford-pets"
    assert manifest.other_available == 250
    assert manifest.skipped == []
    assert (manifest.converted, manifest.converted_counts) == ([], {})  # all RGB JPEGs (README)
    assert manifest.limits == {"max_member_bytes": 32 << 20, "max_pixels": 89_478_485}
    assert manifest.archive.checksum_verified and manifest.archive.sha256 == OXFORD_MINI_SHA256
    assert manifest.archive.bytes == 37_298_939
    # Stratified: round(10 * 0.1) = 1 validation image per breed, 25 of the 250 others.
    assert manifest.split_counts["val"] == {**dict.fromkeys(CAT_BREEDS, 1), "other": 25}
    assert verify_files(Path(ref.root)) == []
    assert Path(ref.root).stat().st_mode & 0o777 == 0o755  # readable by other users and workers
    assert ensure(spec, tmp_path / "data", workers=2) == ref
    assert http_server.count() == 1


def test_petimages_zip_over_http_species_counts_are_exact(http_server, tmp_path):
    """The real 16k-image PetImages zip, served from 127.0.0.1, at one small size (16 px)."""
    url = http_server.add("/petimages/kagglecatsanddogs-180px.zip", PETIMAGES)
    spec = DatasetSpec(
        source=url, checksum=f"sha256:{PETIMAGES_SHA256}", labels="species", image_sizes=[16]
    )
    ref = ensure(spec, tmp_path / "data")
    assert (ref.label_mode, ref.classes) == ("species", ["cat", "other"])
    # Cat/666.jpg is absent from the shared copy (README), hence 7,999 cats.
    assert ref.counts == {"cat": 7999, "other": 8000}
    manifest = read_manifest(Path(ref.root))
    assert manifest.layout == "folder"
    assert manifest.skipped == [] and manifest.converted == []
    assert manifest.archive.checksum_verified and manifest.archive.bytes == 115_424_566
    images = open_split(ref, 16, "train").images
    assert images.shape == (15999, 16, 16, 3) and images.dtype == np.uint8
    assert http_server.count() == 1

    again = ensure(spec, tmp_path / "data")
    assert again == ref
    assert http_server.count() == 1  # the second call made zero requests


def test_oxford_mini_other_cap_is_a_seeded_subset(tmp_path):
    spec = DatasetSpec(source=str(OXFORD_MINI), image_sizes=[8], max_other=40, seed=3)
    first = ensure(spec, tmp_path / "a", workers=2)
    second = ensure(spec, tmp_path / "b", workers=1)
    assert first.counts["other"] == 40 and sum(first.counts.values()) == 160
    assert read_manifest(Path(first.root)).other_available == 250
    # Same spec, separate builds (and worker counts): byte-identical content.
    assert (
        read_manifest(Path(first.root)).content_hash
        == read_manifest(Path(second.root)).content_hash
    )
    no_other = ensure(spec.model_copy(update={"max_other": 0}), tmp_path / "a", workers=2)
    assert no_other.classes == CAT_BREEDS and sum(no_other.counts.values()) == 120


def test_species_fixture_and_open_split(oxford_mini_species_ref):
    ref = oxford_mini_species_ref
    assert (ref.classes, ref.counts) == (["cat", "other"], {"cat": 120, "other": 250})
    assert sorted(ref.caches) == [32, 64]
    train, val = open_split(ref, 64, "train"), open_split(ref, 64, "val")
    assert train.images.shape == (370, 64, 64, 3) and train.images.dtype == np.uint8
    assert isinstance(train.images, np.memmap)  # memory-mapped, not loaded
    assert train.labels.dtype == np.int64 and train.indices.dtype == np.int64
    assert (len(train), len(val)) == (333, 37)
    assert not set(train.indices) & set(val.indices)
    assert np.bincount(train.labels[val.indices]).tolist() == [12, 25]
    image, label = val[0]
    assert image.shape == (64, 64, 3) and label in (0, 1)
    assert 20 < image.mean() < 235  # a photo, not a blank frame
    small = open_split(ref, 32, "val")
    assert np.array_equal(small.indices, val.indices)


def test_load_ref_accepts_every_documented_form(oxford_mini_species_ref, tmp_path):
    ref = oxford_mini_species_ref
    root = Path(ref.root)
    assert load_ref(ref) is ref
    assert load_ref(ref.model_dump_json()) == ref
    # The JSON-mode dict that Prefect tasks and Modal functions pass (the promotion's rejudge
    # once handed it on and failed: str() of a dict is not JSON).
    assert load_ref(ref.model_dump(mode="json")) == ref
    with pytest.raises(PermanentError, match="not a DatasetRef"):
        load_ref({"root": str(root)})
    assert load_ref(root) == ref
    assert load_ref(str(root / "reference.json")) == ref
    assert load_ref(root / "manifest.json") == ref
    assert json.loads((root / "reference.json").read_text()) == json.loads(ref.model_dump_json())
    assert DatasetRef.model_validate_json(ref.model_dump_json()).caches[64] == "images_64.npy"
    with pytest.raises(PermanentError, match="not a published data set version"):
        load_ref(tmp_path)
    missing = tmp_path / "no-such-version"
    with pytest.raises(PermanentError, match=f"dataset '{missing}' does not exist"):
        load_ref(missing)
    # A reference (object or JSON) whose folder holds no valid manifest, like a half-built
    # staging copy, is refused too: the check follows the folder, not the form of the input.
    half = tmp_path / "half-built"
    half.mkdir()
    for name in ("images_32.npy", "labels.npy", "split.npy"):
        (half / name).symlink_to(root / name)
    stale = ref.model_copy(update={"root": str(half)})
    for form in (stale, stale.model_dump_json()):
        with pytest.raises(PermanentError, match="is not a published data set version"):
            load_ref(form)
    with pytest.raises(ValueError, match=r"no cache at 48 px .*\[32, 64\]"):
        open_split(ref, 48, "train")
    with pytest.raises(ValueError, match="'train' or 'val'"):
        open_split(ref, 32, "test")


@pytest.mark.parametrize("damage", ["labels-out-of-range", "all-train", "truncated-cache"])
def test_a_damaged_packed_cache_is_refused_naming_the_folder(
    oxford_mini_species_ref, tmp_path, damage
):
    """Damage done in place after publishing (the manifest still looks valid) is caught when the
    cache is opened, with an error naming the folder, never an IndexError mid-training."""
    root = tmp_path / Path(oxford_mini_species_ref.root).name  # a version keeps its folder name
    shutil.copytree(oxford_mini_species_ref.root, root)
    ref = load_ref(root)
    if damage == "labels-out-of-range":
        labels = np.load(root / ref.labels)
        labels[0] = 99
        np.save(root / ref.labels, labels)
        expected = r"labels\.npy holds ids outside \[0, 2\)"
    elif damage == "all-train":
        np.save(root / ref.split, np.zeros_like(np.load(root / ref.split)))
        expected = "the 'val' split is empty"
    else:
        cache = root / ref.caches[32]
        cache.write_bytes(b"not a numpy file" + cache.read_bytes()[16:])  # same size
        expected = "cannot read the packed cache"
    with pytest.raises(PermanentError, match=expected) as caught:
        open_split(ref, 32, "val")
    assert str(root) in str(caught.value)
