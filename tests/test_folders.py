"""medplan's one rule for folders of cases (medplan.io.images_by_case), used by raw datasets,
medplan_evaluate's prediction/ground-truth folders and medplan_predict's inputs."""
import numpy as np
import pytest
from PIL import Image

from medplan.errors import MedplanError
from medplan.evaluation.evaluate import label_files
from medplan.inference import list_images
from medplan.io import images_by_case


def _png(path, value=0):
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(path)


def test_cases_are_file_names_without_their_image_suffix(tmp_path):
    _png(tmp_path / "b.png")
    _png(tmp_path / "a.png")
    (tmp_path / "c.nii.gz").write_bytes(b"x")      # a two-part suffix is one suffix
    (tmp_path / "notes.txt").write_text("x")       # not an image
    _png(tmp_path / ".hidden.png")                 # hidden
    (tmp_path / "sub.png").mkdir()                 # not a file
    found = images_by_case(tmp_path)
    assert list(found) == ["a", "b", "c"] and found["c"].name == "c.nii.gz"
    assert list(images_by_case(tmp_path, skip=lambda p: p.name == "b.png")) == ["a", "c"]


def test_two_files_of_one_case_are_an_error_naming_both(tmp_path):
    _png(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a.jpg")
    with pytest.raises(MedplanError, match=r"two prediction files for case 'a' \(a\.jpg, a\.png\)"):
        images_by_case(tmp_path, "prediction")
    with pytest.raises(MedplanError, match="two prediction files for case 'a'"):
        label_files(tmp_path, "prediction")
    with pytest.raises(MedplanError, match="two image files for case 'a'"):
        list_images(tmp_path)


def test_the_callers_keep_their_own_rules(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "a_overlay.png")  # medplan_predict's overlay beside its label map
    assert list(label_files(tmp_path, "prediction")) == ["a"]
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "a_overlay.png"]
    with pytest.raises(MedplanError, match="prediction folder not found"):
        label_files(tmp_path / "missing", "prediction")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedplanError, match="no images in this folder"):
        list_images(empty)
